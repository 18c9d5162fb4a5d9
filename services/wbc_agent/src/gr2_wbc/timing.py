"""Fixed-size rings of timing samples for the loop's percentiles."""

from __future__ import annotations

import math

import numpy as np


class TimingRing:
    """Fixed-size float ring of timing samples [s] (no allocation per push)."""

    def __init__(self, size: int) -> None:
        self.data = np.zeros(size)
        self.count = 0

    def push(self, value: float) -> None:
        self.data[self.count % self.data.shape[0]] = value
        self.count += 1

    def values(self) -> np.ndarray:
        return self.data[: min(self.count, self.data.shape[0])]

    def percentiles(self, prefix: str) -> dict[str, float]:
        """``{prefix}_p50_s``, ``{prefix}_p99_s`` and ``{prefix}_max_s`` (NaN when empty)."""
        v = self.values()
        if v.size == 0:
            return {f"{prefix}_{k}_s": math.nan for k in ("p50", "p99", "max")}
        p50, p99 = np.percentile(v, (50.0, 99.0))
        return {
            f"{prefix}_p50_s": float(p50),
            f"{prefix}_p99_s": float(p99),
            f"{prefix}_max_s": float(v.max()),
        }
