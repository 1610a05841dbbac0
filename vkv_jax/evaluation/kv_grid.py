"""The equal-KV grid: per method, the budget whose *measured* live KV share hits each grid point.

Budgets mean different things per method (AirCache: a ratio of the visual tokens with all text kept;
SnapKV: a ratio of the whole prompt; FastV: visual tokens after layer K), so methods are compared at the
same live KV share instead: `solve` searches the budget of one method for each target share, calling
`measure(budget) -> share` (the harness runs the method over every question and returns live KV bytes /
full KV bytes, `protocols.answer_batch`). The share is taken as non-decreasing in the budget; it is a step
function (counts are whole tokens), so a point can fall in a jump.

Search per target t: probe the method's lowest budget (its floor share) and 1.0 (its ceiling), then shrink
the bracket [budget with share <= t, budget with share >= t] by alternating a secant step and a bisection
step until a probe is within `tol` of t, the bracket is narrower than `min_width`, or `max_probes` probes
were spent. Every probe is memoised (later targets reuse earlier probes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

DEFAULT_GRID = (0.05, 0.10, 0.15, 0.20, 0.30, 0.50)
TOLERANCE = 0.005  # 0.5 points of KV share


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """The outcome for one target share.

    status: "hit" (|share - target| <= tol), "missed" (the share jumps over the target: the nearest
    probe is given), "below floor" (the method keeps more than the target at its lowest budget; budget and
    share are that floor), "above ceiling" (it keeps less than the target even at budget 1.0).
    """

    target: float | None  # None: a method without a budget (one share, status "fixed")
    budget: float | None
    share: float
    status: str

    @property
    def hit(self) -> bool:
        return self.status == "hit"


def solve(measure: Callable[[float], float], targets: Sequence[float], lo: float, hi: float = 1.0, *,
          tol: float = TOLERANCE, max_probes: int = 12, min_width: float = 1e-4) -> list[GridPoint]:
    """One GridPoint per target (in the order given); `measure` is called once per distinct budget."""
    probes: dict[float, float] = {}

    def share(b: float) -> float:
        if b not in probes:
            probes[b] = float(measure(b))
        return probes[b]

    floor, ceiling = share(lo), share(hi)
    out = []
    for t in targets:
        if t < floor - tol:
            out.append(GridPoint(t, lo, floor, "below floor"))
            continue
        if t > ceiling + tol:
            out.append(GridPoint(t, hi, ceiling, "above ceiling"))
            continue
        for step in range(max_probes):
            best = min(probes, key=lambda b: (abs(probes[b] - t), b))
            if abs(probes[best] - t) <= tol:
                break
            below = max((b for b, s in probes.items() if s < t), default=lo)
            above = min((b for b, s in probes.items() if s > t and b > below), default=hi)
            if above - below < min_width:
                break
            s_lo, s_hi = probes[below], probes[above]
            mid = 0.5 * (below + above)
            if step % 2 == 0 and s_hi > s_lo:  # secant step, kept inside the inner 90% of the bracket
                mid = below + (t - s_lo) / (s_hi - s_lo) * (above - below)
                mid = min(max(mid, below + 0.05 * (above - below)), above - 0.05 * (above - below))
            share(mid)
        best = min(probes, key=lambda b: (abs(probes[b] - t), b))
        status = "hit" if abs(probes[best] - t) <= tol else "missed"
        out.append(GridPoint(t, best, probes[best], status))
    return out
