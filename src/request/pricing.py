"""What a job costs: the price of one image times the images returned (flagged ones are free),
plus the prompt expansion's price when the prompt was expanded."""

from __future__ import annotations


def job_cost(price_per_image_usd: float, images_returned: int, expansion_usd: float = 0.0) -> float:
    return round(price_per_image_usd * images_returned + expansion_usd, 6)
