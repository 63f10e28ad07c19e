"""Paired timing: every model gets the same rounds, one session alive at a time, medians of rounds."""

from __future__ import annotations

import numpy as np

from rescompress.bench.paired import time_paired


def test_rounds_alternate_and_every_sample_is_kept():
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
    paired = time_paired({"a": loader("a"), "b": loader("b")}, x, rounds=3, runs=7, warmup=2,
                         on_round=lambda r, name, p50: seen.append((r, name)))
    assert order == ["a", "b"] * 3
    assert seen == [(0, "a"), (0, "b"), (1, "a"), (1, "b"), (2, "a"), (2, "b")]
    for name in ("a", "b"):
        assert len(paired.round_p50s[name]) == 3 and len(paired.samples[name]) == 3 * 7
        summary = paired.summary(name)
        assert summary["p50_ms"] == np.median(summary["round_p50s_ms"]) and summary["p90_ms"] > 0
    assert paired.ratio("a", "b") == paired.p50("a") / paired.p50("b")
