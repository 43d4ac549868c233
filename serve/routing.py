"""Weighted traffic split over the routes (version refs) of one served model.

    router = TrafficRouter({"production": 90, "staging": 10})
    router.pick()            # smooth weighted round-robin: exactly 9 of every 10 picks are production
    router.pick("user-42")   # sticky: a hash of the key, so the same key always gets the same route

Requests without a key follow a smooth weighted round-robin (the nginx algorithm), so any run of
sum(weights) consecutive picks matches the weights exactly, with the minority route spread out
rather than bunched. Keyed requests hash the key (SHA-256, stable across processes, unlike
`hash()`) into 10,000 buckets laid out by cumulative weight: a weight change moves only the keys
in the buckets that change hands. Routes of weight 0 are never picked (they can still be called
explicitly, e.g. to test a green deployment before flipping traffic to it).
"""

from __future__ import annotations

import hashlib

BUCKETS = 10_000


def key_bucket(key: str) -> int:
    """Stable bucket in [0, BUCKETS) of a sticky key."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % BUCKETS


class TrafficRouter:
    """Picks a route per request; `set_weights` changes the split live."""

    def __init__(self, weights: dict[str, int]):
        self.set_weights(weights)

    def set_weights(self, weights: dict[str, int]) -> None:
        if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"traffic weights must be >= 0 with a positive sum, got {weights}")
        self.weights = dict(weights)
        self._total = sum(weights.values())
        self._current = {route: 0 for route in weights}  # smooth WRR state

    @property
    def routes(self) -> list[str]:
        return list(self.weights)

    def pick(self, key: str | None = None) -> str:
        if key:
            return self.route_of_bucket(key_bucket(key))
        # Smooth weighted round-robin: every route gains its weight, the leader is picked and pays the total.
        for route, weight in self.weights.items():
            self._current[route] += weight
        best = max(self._current, key=lambda r: self._current[r])
        self._current[best] -= self._total
        return best

    def route_of_bucket(self, bucket: int) -> str:
        """The route owning a bucket: buckets are split in route order by cumulative weight."""
        edge = 0
        for route, weight in self.weights.items():
            edge += weight * BUCKETS // self._total
            if bucket < edge and weight > 0:
                return route
        return next(r for r in reversed(self.weights) if self.weights[r] > 0)  # rounding remainder
