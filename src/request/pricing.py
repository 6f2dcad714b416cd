"""What a job costs: the price of one image times the images returned (flagged ones are free)."""

from __future__ import annotations


def job_cost(price_per_image_usd: float, images_returned: int) -> float:
    return round(price_per_image_usd * images_returned, 6)
