"""How far a load is, as one never-decreasing fraction (pure: `Engine.progress()` feeds it).

The download (when the load has one) is the first half of the bar; then the weights mapped
while the server loads: its memory high-water against the model's bytes, at most 0.99 until
it is healthy, 1.0 once ready.
"""

from __future__ import annotations

from dataclasses import dataclass

DOWNLOAD_SHARE = 0.5  # of the bar, for a load that downloads
BEFORE_HEALTHY = 0.99  # mapped is not ready: the bar stops short until /health answers


@dataclass(frozen=True, slots=True)
class ProgressMark:
    """The high-water of one load's progress."""

    load_id: str = ""
    high: int = 0  # bytes mapped, at most
    fraction: float = 0.0

    def advance(
        self, load_id: str, mapped: int, total: int, *, ready: bool, downloaded: float | None
    ) -> ProgressMark:
        """The mark after a new sample: `mapped` bytes of `total`, `downloaded` the share of
        the download done (None: the load downloads nothing)."""
        mark = self if load_id == self.load_id else ProgressMark(load_id)
        high = max(mark.high, mapped)
        mapped_fraction = min(high / total, BEFORE_HEALTHY) if total else 0.0
        if ready:
            mapped_fraction = 1.0
        share = DOWNLOAD_SHARE if downloaded is not None else 0.0
        fraction = share * (downloaded or 0.0) + (1.0 - share) * mapped_fraction
        return ProgressMark(load_id, high, max(fraction, mark.fraction))
