"""Near-duplicate detection on 64-bit perceptual hashes, as pure functions and one small index.

Two images are near-duplicates when their pHashes differ in at most `threshold` bits (Hamming distance).
The index never compares all pairs: the 64 bits are split into `threshold + 1` bands, and by pigeonhole
two hashes within the threshold agree exactly on at least one band, so only hashes sharing a band value
are compared. Insertion order decides which copy survives (the first one), so results are deterministic.
"""

from __future__ import annotations

HASH_BITS = 64
MAX_THRESHOLD = 16  # beyond this, bands get so short that almost every hash collides with every other


def band_masks(threshold: int, bits: int = HASH_BITS) -> list[tuple[int, int]]:
    """(shift, mask) of `threshold + 1` contiguous bands covering all `bits`, sizes differing by at most 1."""
    n = threshold + 1
    out, start = [], 0
    for k in range(n):
        width = bits // n + (1 if k < bits % n else 0)
        out.append((start, (1 << width) - 1))
        start += width
    return out


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class NearDuplicateIndex:
    """`add(h)` returns True and remembers `h` unless a remembered hash is within `threshold` bits."""

    def __init__(self, threshold: int = 4):
        if not 0 <= threshold <= MAX_THRESHOLD:
            raise ValueError(f"near-duplicate threshold must be in [0, {MAX_THRESHOLD}] bits (got {threshold})")
        self.threshold = threshold
        self.bands = band_masks(threshold)
        self._table: dict[tuple[int, int], list[int]] = {}
        self.comparisons = 0  # hash pairs actually compared (for tests and the report)

    def add(self, h: int) -> bool:
        keys = [(k, (h >> shift) & mask) for k, (shift, mask) in enumerate(self.bands)]
        checked: set[int] = set()
        for key in keys:
            for other in self._table.get(key, ()):
                if other in checked:
                    continue
                checked.add(other)
                self.comparisons += 1
                if hamming(h, other) <= self.threshold:
                    return False
        for key in keys:
            self._table.setdefault(key, []).append(h)
        return True
