from __future__ import annotations

import time

import numpy as np

from rescompress.bench import measure_latency, provenance
from rescompress.bench.latency import HOST_METHOD, TEST_IMAGES, time_artifact
from rescompress.pipeline import recommend


def test_latency_statistics_are_ordered_and_counted():
    calls = []

    def fn(x):
        calls.append(x.shape)
        time.sleep(0.001)
        return x

    stats = measure_latency(fn, np.zeros((2, 1, 4, 4)), warmup=3, runs=12, threads=1)
    assert len(calls) == 15 and calls[0] == (2, 1, 4, 4)
    assert 1.0 <= stats.min_ms <= stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.batch == 2 and stats.runs == 12 and stats.threads == 1 and stats.source == "measured"


def test_time_artifact_times_the_artifact_runner_and_releases_it():
    from rescompress.data import InputSpec
    from rescompress.export.artifact import Artifact

    loads, calls = [], []

    def load_runner(path, threads):
        loads.append(threads)
        return lambda x: calls.append(x.shape) or x

    art = Artifact(name="a", target="onnx", precision="fp32", path=None, runtime="onnxruntime 9.9",
                   input_spec=InputSpec(1, 4, 4, (0.0,), (1.0,)), load_runner=load_runner)
    lat = time_artifact(art, np.zeros((3, 1, 4, 4)), input_kind=TEST_IMAGES, warmup=2, runs=5, threads=2)
    assert loads == [2] and len(calls) == 7 and calls[0] == (3, 1, 4, 4)
    assert art._runner is None, "the session was kept after timing"
    assert (lat["runtime"], lat["input"], lat["method"], lat["source"]) == ("onnxruntime 9.9", TEST_IMAGES,
                                                                            HOST_METHOD, "measured")
    assert (lat["batch"], lat["warmup"], lat["runs"], lat["threads"]) == (3, 2, 5, 2)


def test_provenance_names_versions():
    p = provenance()
    assert p["torch"] and p["onnxruntime"] and p["cpu_count"] >= 1


def _row(name, top1_delta, p50):
    return {"artifact": name, "delta_top1_pt": top1_delta, "latency": {"p50_ms": p50, "source": "measured"}}


def test_recommendation_is_the_fastest_within_budget():
    rows = [_row("fp32", 0.0, 2.0), _row("int8", -0.4, 0.7), _row("int4", -3.0, 0.3),
            {"artifact": "trt", "delta_top1_pt": None, "latency": None}]
    rec = recommend(rows, budget_pt=1.0)
    assert rec["artifact"] == "int8" and "within 1.0 pt" in rec["reason"] and "measured" in rec["reason"]
    assert recommend(rows, budget_pt=0.1)["artifact"] == "fp32"
    assert recommend([_row("bad", -5.0, 1.0)], budget_pt=1.0) is None
