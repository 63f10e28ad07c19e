"""Paired timing: every model gets the same rounds, one session alive at a time, medians of rounds."""

from __future__ import annotations

import numpy as np

from rescompress.bench.paired import time_paired


def test_rounds_alternate_in_both_orders_and_every_sample_is_kept():
    order: list[str] = []
    alive: list[str] = []

    def loader(name: str):
        def load():
            order.append(name)
            assert not alive, "a previous session is still alive"
            alive.append(name)

            class Session:
                def __call__(self, x):
                    return x * 2

                def __del__(self):
                    alive.remove(name)

            return Session()
        return load

    x = np.ones((1, 3), np.float32)
    seen = []
    paired = time_paired({"a": loader("a"), "b": loader("b"), "c": loader("c")}, x, rounds=4, runs=7, warmup=2,
                         on_round=lambda r, name, p50: seen.append((r, name)))
    assert order == ["a", "b", "c", "c", "b", "a"] * 2
    assert seen == [(r, name) for r, name in zip([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3], order)]
    # over the 4 rounds every model has the same mean place in the round
    for name in ("a", "b", "c"):
        places = [order[r * 3:(r + 1) * 3].index(name) for r in range(4)]
        assert sum(places) == 4
    for name in ("a", "b", "c"):
        assert len(paired.round_p50s[name]) == 4 and len(paired.samples[name]) == 4 * 7
        summary = paired.summary(name)
        assert summary["p50_ms"] == np.median(summary["round_p50s_ms"]) and summary["p90_ms"] > 0
    assert paired.ratio("a", "b") == paired.p50("a") / paired.p50("b")
