"""The recommendation: chosen on validation top-1, reported with test top-1, ranked within one latency source."""

from __future__ import annotations

from rescompress.pipeline import recommend


def _row(name, *, val, test, p50, source="measured"):
    return {"artifact": name, "top1": 0.9 + test / 100, "delta_top1_pt": test, "delta_val_top1_pt": val,
            "latency": {"p50_ms": p50, "source": source}}


def test_the_budget_is_judged_on_validation_not_test():
    # int8 looks fine on test (-0.2 pt) but lost 2 pt on validation; fp16 is the other way round
    rows = [_row("fp32", val=0.0, test=0.0, p50=3.0), _row("int8", val=-2.0, test=-0.2, p50=1.0),
            _row("fp16", val=-0.5, test=-1.8, p50=2.0)]
    rec = recommend(rows, budget_pt=1.0)
    assert rec["artifact"] == "fp16" and rec["selected_on"] == "validation"
    assert "validation top-1 (-0.50 pt)" in rec["reason"]
    assert "test top-1 88.20 % (-1.80 pt), not used to choose" in rec["reason"]


def test_without_a_validation_split_test_decides_and_the_reason_says_so():
    rows = [_row("fp32", val=None, test=0.0, p50=3.0), _row("int8", val=None, test=-0.4, p50=1.0)]
    rec = recommend(rows, budget_pt=1.0)
    assert rec["artifact"] == "int8" and rec["selected_on"] == "test"
    assert "no validation split" in rec["reason"]


def test_an_estimate_never_beats_a_measurement():
    rows = [_row("onnx-fp32", val=0.0, test=0.0, p50=4.0, source="measured-remote"),
            _row("onnx-int8", val=-0.3, test=-0.3, p50=2.5, source="measured-remote"),
            _row("tensorrt-int8", val=-0.2, test=-0.2, p50=0.4, source="estimated")]
    rec = recommend(rows, budget_pt=1.0)
    assert rec["artifact"] == "onnx-int8" and rec["latency_source"] == "measured-remote"
    assert "sources were mixed: 1 candidate(s) with only estimated latency" in rec["reason"]


def test_estimates_rank_among_themselves_when_nothing_was_measured():
    rows = [_row("a", val=0.0, test=0.0, p50=4.0, source="estimated"),
            _row("b", val=-0.1, test=0.0, p50=1.5, source="estimated")]
    rec = recommend(rows, budget_pt=1.0)
    assert rec["artifact"] == "b" and "mixed" not in rec["reason"]


def test_a_measured_candidate_out_of_budget_leaves_the_estimated_ones():
    rows = [_row("int8", val=-3.0, test=-3.0, p50=1.0, source="measured-remote"),
            _row("fp32", val=0.0, test=0.0, p50=5.0, source="estimated")]
    assert recommend(rows, budget_pt=1.0)["artifact"] == "fp32"
    assert recommend(rows[:1], budget_pt=1.0) is None
