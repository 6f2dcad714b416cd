"""What a job costs: the price of one image times the images returned (flagged ones are free),
plus the prompt expansion's price when the prompt was expanded. An upscaled image's price is
per megapixel of output (API.md, "Upscaling")."""

from __future__ import annotations


def job_cost(price_per_image_usd: float, images_returned: int, expansion_usd: float = 0.0) -> float:
    return round(price_per_image_usd * images_returned + expansion_usd, 6)


def per_megapixel(price_per_mp_usd: float, width: int, height: int) -> float:
    """An image priced by its size (upscaling): the price per 1024x1024 pixels times its pixels."""
    return price_per_mp_usd * width * height / 1024**2
