"""Paired latency: several models timed in alternating rounds in one process, so machine noise hits them
alike; ratios of medians are the figures to read on a shared machine.

The order within a round reverses every other round (a b c, c b a, a b c, ...): a model's place in the
round (what ran just before it, how warm the caches and clocks are) then falls on every model alike over
an even number of rounds, instead of always favouring the same one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from rescompress.bench.latency import measure_latency

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class Paired:
    """Per model: each round's p50 and every timed sample (ms)."""
    round_p50s: dict[str, list[float]] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)

    def p50(self, name: str) -> float:
        """The median of the rounds' medians."""
        return float(np.median(self.round_p50s[name]))

    def p90(self, name: str) -> float:
        """The 90th percentile over every timed call of every round."""
        return float(np.percentile(self.samples[name], 90))

    def ratio(self, slow: str, fast: str) -> float:
        """How many times faster `fast` is than `slow` (ratio of medians)."""
        return self.p50(slow) / self.p50(fast)

    def summary(self, name: str) -> dict:
        return {"p50_ms": self.p50(name), "p90_ms": self.p90(name), "round_p50s_ms": self.round_p50s[name]}


def time_paired(loaders: dict[str, Callable[[], Runner]], x: np.ndarray, *, rounds: int = 4, runs: int = 50,
                warmup: int = 10, threads: Optional[int] = None,
                on_round: Optional[Callable[[int, str, float], None]] = None) -> Paired:
    """Time every model `runs` times per round, `rounds` rounds, models in turn within each round (forward
    in even rounds, backward in odd ones; use an even `rounds` for a balanced order); one session alive
    at a time (`loaders[name]()` builds it; it is dropped after its turn)."""
    out = Paired({name: [] for name in loaders}, {name: [] for name in loaders})
    names = list(loaders)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn = loaders[name]()
            samples: list[float] = []
            stats = measure_latency(_recording(fn, samples), x, warmup=warmup, runs=runs, threads=threads)
            out.round_p50s[name].append(stats.p50_ms)
            out.samples[name].extend(samples[warmup:])
            if on_round is not None:
                on_round(r, name, stats.p50_ms)
            del fn
    return out


def _recording(fn: Runner, samples: list[float]) -> Runner:
    """`fn`, recording each call's wall time (ms) into `samples` (warm-up calls included, first)."""
    import time

    def call(x: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter_ns()
        y = fn(x)
        samples.append((time.perf_counter_ns() - t0) / 1e6)
        return y

    return call
