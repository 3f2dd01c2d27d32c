"""Aspect-ratio buckets as pure functions.

A bucket is an image size (width, height) with both sides multiples of 16 px (VAE /8, then 2x2
patches), area close to a target area, aspect ratio (w/h) within [0.25, 4.0]. Every image goes to the
bucket whose aspect ratio is closest in log space, then is resized to cover it and centre-cropped.
"""

from __future__ import annotations

import math

from PIL import Image

SIDE_MULTIPLE = 16


def make_buckets(target_side: int, min_ar: float = 0.25, max_ar: float = 4.0, multiple: int = SIDE_MULTIPLE) -> list[tuple[int, int]]:
    """All (w, h) with sides multiple of `multiple`, area <= target_side^2, as close to it as possible."""
    area = target_side * target_side
    buckets = set()
    h = multiple
    while h <= area // multiple:
        w = (area // h) // multiple * multiple
        if w >= multiple and min_ar <= w / h <= max_ar:
            buckets.add((w, h))
        h += multiple
    # keep, per aspect ratio, the largest-area bucket; drop near-duplicates in log-AR (< 1%)
    result: list[tuple[int, int]] = []
    for w, h in sorted(buckets, key=lambda b: b[0] / b[1]):
        if result and abs(math.log((w / h) / (result[-1][0] / result[-1][1]))) < 0.01:
            if w * h > result[-1][0] * result[-1][1]:
                result[-1] = (w, h)
            continue
        result.append((w, h))
    return result


def bucket_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the closest aspect ratio (log distance)."""
    ar = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ar))


def aspect_error(width: int, height: int, bucket: tuple[int, int]) -> float:
    """Relative aspect-ratio change an image undergoes when cropped to `bucket`."""
    return abs((bucket[0] / bucket[1]) / (width / height) - 1.0)


def resize_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize to cover the bucket (keeping aspect ratio), then centre-crop to it."""
    bw, bh = bucket
    scale = max(bw / image.width, bh / image.height)
    w, h = max(bw, round(image.width * scale)), max(bh, round(image.height * scale))
    image = image.resize((w, h), Image.BICUBIC if scale > 1 else Image.LANCZOS)
    left, top = (w - bw) // 2, (h - bh) // 2
    return image.crop((left, top, left + bw, top + bh))
