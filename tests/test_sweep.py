"""Sweeps: trial expansion and recipe overrides (unit), then real sweeps of the tiny recipe: locally with a
shared-prefix cache, on a local Ray started here, and a killed sweep that resumes."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rescompress.errors import RecipeError
from rescompress.recipe import parse_recipe, parse_sweep
from rescompress.sweep import Sweep, apply_overrides, expand, parse_grid_option, run_sweep, step_keys
from tests.conftest import TINY_RECIPE, write_recipe

RAW = {"stages": [{"prune": {"macs_reduction": 1.5, "round_to": 8, "epochs": 1}}, {"finetune": None},
                  {"qat": {"epochs": 1}}]}


def test_grid_option_values_are_typed():
    assert parse_grid_option("stages.0.prune.macs_reduction=1.5,2,3") == ("stages.0.prune.macs_reduction", [1.5, 2, 3])
    assert parse_grid_option("stages.2.qat.scheme=tensorrt, onnxruntime") == ("stages.2.qat.scheme",
                                                                               ["tensorrt", "onnxruntime"])
    assert parse_grid_option("x.y=true,null")[1] == [True, None]
    for bad in ("stages.0.prune.macs_reduction", "=1,2", "a.b="):
        with pytest.raises(RecipeError, match="PATH=VALUE"):
            parse_grid_option(bad)


def test_grid_is_every_combination_and_random_search_draws_distinct_trials():
    cfg = parse_sweep({"grid": {"a": [1, 2, 3], "b": ["x", "y"]}})
    trials = expand(cfg)
    assert len(trials) == 6 and trials[0] == {"a": 1, "b": "x"} and trials[-1] == {"a": 3, "b": "y"}

    cfg = parse_sweep({"grid": {"a": [1, 2, 3]}, "random": {"trials": 4, "seed": 7, "space": {
        "lr": {"low": 1e-3, "high": 1e-1, "log": True}, "epochs": {"low": 1, "high": 5, "integer": True}}}})
    drawn = expand(cfg)
    assert len(drawn) == 4 and len({json.dumps(d, sort_keys=True) for d in drawn}) == 4
    assert drawn == expand(cfg)  # seeded
    for d in drawn:
        assert d["a"] in (1, 2, 3) and 1e-3 <= d["lr"] <= 1e-1 and isinstance(d["epochs"], int)
    # a discrete space smaller than the budget gives what it holds
    assert len(expand(parse_sweep({"grid": {"a": [1, 2]}, "random": {"trials": 5}}))) == 2
    with pytest.raises(RecipeError, match="nothing to vary"):
        expand(parse_sweep({}))
    with pytest.raises(RecipeError, match="low"):
        parse_sweep({"random": {"trials": 2, "space": {"lr": {"low": 1, "high": 0.5}}}})


def test_overrides_set_dotted_paths_and_name_what_does_not_exist():
    data = apply_overrides(RAW, {"stages.0.prune.macs_reduction": 2, "stages.1.finetune.epochs": 2, "train.lr": 0.1})
    assert data["stages"][0]["prune"]["macs_reduction"] == 2 and data["stages"][1] == {"finetune": {"epochs": 2}}
    assert data["train"] == {"lr": 0.1} and RAW["stages"][0]["prune"]["macs_reduction"] == 1.5  # a copy
    with pytest.raises(RecipeError, match="stages has 3 entries; stages.5 is not one of them"):
        apply_overrides(RAW, {"stages.5.qat.epochs": 1})
    with pytest.raises(RecipeError, match="stages.0 is a prune entry, not qat"):
        apply_overrides(RAW, {"stages.0.qat.epochs": 1})
    with pytest.raises(RecipeError, match="stages.0.prune.epochs is a value"):
        apply_overrides(RAW, {"stages.0.prune.epochs.x": 1})


def test_step_keys_share_exactly_the_common_prefix():
    base = parse_recipe(RAW)
    later = parse_recipe(apply_overrides(RAW, {"stages.2.qat.epochs": 2}))
    earlier = parse_recipe(apply_overrides(RAW, {"stages.0.prune.macs_reduction": 2}))
    devices = parse_recipe(apply_overrides(RAW, {"devices": ["jetson-orin-nano"]}))
    k = step_keys(base)
    assert len(k) == 4
    assert step_keys(later)[:3] == k[:3] and step_keys(later)[3] != k[3]
    assert step_keys(earlier)[0] == k[0] and step_keys(earlier)[1] != k[1]
    # the devices decide the int8 scheme: only the quantizing stage and what follows differ
    assert step_keys(devices)[:3] == k[:3] and step_keys(devices)[3] != k[3]
    assert step_keys(parse_recipe(apply_overrides(RAW, {"seed": 1})))[0] != k[0]


def test_an_invalid_trial_fails_before_anything_is_created(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", {**TINY_RECIPE, "stages": RAW["stages"][:1]})
    with pytest.raises(RecipeError, match=r"sweep trial t001 \(stages.0.prune.macs_reduction=0.5\).*macs_reduction"):
        Sweep.create(recipe, tmp_path / "runs", ["stages.0.prune.macs_reduction=1.5,0.5"], None, None, None, None,
                     None, None)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_a_grid_path_given_twice_is_refused(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", {**TINY_RECIPE, "stages": RAW["stages"][:1]})
    with pytest.raises(RecipeError, match=r"--grid train.lr is given more than once; list all its values in one"):
        Sweep.create(recipe, tmp_path / "runs", ["train.lr=0.1", "train.lr=0.2,0.3"], None, None, None, None,
                     None, None)


def test_sweep_dry_run_lists_trials_and_a_bad_path_exits_2(tmp_path):
    from typer.testing import CliRunner

    from rescompress.cli import app

    recipe = write_recipe(tmp_path / "tiny.yaml", {**TINY_RECIPE, "stages": RAW["stages"][:1]})
    ok = CliRunner().invoke(app, ["sweep", str(recipe), "--grid", "stages.0.prune.macs_reduction=1.5,2",
                                  "--grid", "train.lr=0.05,0.1", "--dry-run"])
    assert ok.exit_code == 0, ok.output
    assert "4 trials" in ok.output and "t003" in ok.output and "train.lr=0.1" in ok.output
    bad = CliRunner().invoke(app, ["sweep", str(recipe), "--grid", "stages.3.prune.epochs=1", "--dry-run"])
    assert bad.exit_code == 2 and "stages has 1 entries; stages.3 is not one of them" in bad.output


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlinked-folder", "symlinked-file", "damaged"])
def test_a_cache_entry_that_leads_outside_the_trial_is_refused(tmp_path, how):
    from rescompress.sweep import run_trial

    sweep = Sweep.create(_sweep_recipe(tmp_path), tmp_path / "runs", ["stages.1.finetune.epochs=0,1"], None, None,
                         "local", None, None, None)
    run_dir, outside = sweep.dir / "trials" / "t000", tmp_path / "outside"
    (run_dir / "checkpoints").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.pt").write_bytes(b"someone else's file")
    entry = sweep.dir / "cache" / sweep.keys(sweep.trials[0])[0]  # the baseline's cache entry
    entry.mkdir(parents=True)
    (entry / "evil.pt").write_bytes(b"not a checkpoint")
    checkpoint = {"dotdot": os.path.relpath(outside / "evil.pt", run_dir), "absolute": str(outside / "evil.pt"),
                  "symlinked-folder": "checkpoints/out/evil.pt", "symlinked-file": "checkpoints/secret.pt",
                  "damaged": "checkpoints/evil.pt"}[how]
    if how == "symlinked-folder":  # a folder of the run that links out of it
        (run_dir / "checkpoints" / "out").symlink_to(outside)
    if how == "symlinked-file":  # a file of the entry that links out of it
        (entry / "secret.pt").symlink_to(outside / "secret.pt")
    data = {"step": "baseline", "trial": "t009", "checkpoint": checkpoint, "sha256": "0" * 64, "record": {}}
    (entry / "entry.json").write_text("{" if how == "damaged" else json.dumps(data))

    result = run_trial(sweep.dir, "t000", quiet=True)
    assert result["status"] == "failed"
    assert re.fullmatch(rf"sweep cache entry {re.escape(str(entry))}/entry.json(: checkpoint .* leads outside the "
                        rf"run's checkpoints/| is damaged .*); delete {re.escape(str(entry))} to have the step "
                        rf"computed again", result["message"]), result["message"]
    assert sorted(p.name for p in outside.iterdir()) == ["secret.pt"]  # nothing written outside
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == (["out"] if how == "symlinked-folder" else [])
    assert "baseline" not in _manifest(run_dir)["steps"]


# --- real sweeps ----------------------------------------------------------------------------------

BUDGET_PT = 2.0


def _sweep_recipe(tmp_path: Path, stages: list | None = None, train: dict | None = None) -> Path:
    data = copy.deepcopy(TINY_RECIPE)
    data["train"].update(train or {})
    data["stages"] = stages or [{"prune": {"macs_reduction": 1.5, "round_to": 8, "epochs": 1}},
                                {"finetune": {"epochs": 1}}]
    data["report"]["accuracy_budget_pt"] = BUDGET_PT
    return write_recipe(tmp_path / "tiny.yaml", data)


def _selection_key(rows: list[dict]) -> str:
    """The Δ the recommendation selects on: validation top-1 where the rows have it, else test."""
    return "delta_val_top1_pt" if any(r.get("delta_val_top1_pt") is not None for r in rows) else "delta_top1_pt"


def _check_merged(sweep_dir: Path, trials: int) -> dict:
    from rescompress.report import load_report

    report = load_report(sweep_dir / "report.json")
    assert len(report["sweep"]["trials"]) == trials
    assert all(t["status"] == "done" for t in report["sweep"]["trials"])
    (device,) = report["devices"]
    assert {r["artifact"].split("/")[0] for r in device["results"]} == {f"t{i:03d}" for i in range(trials)}
    own = {f"t{i:03d}": load_report(sweep_dir / "trials" / f"t{i:03d}" / "report.json")["stages"][0]
           for i in range(trials)}
    for row in device["results"]:  # every artifact against its own trial's baseline
        base = own[row["artifact"].split("/")[0]]
        if row.get("top1") is not None:
            assert row["delta_top1_pt"] == pytest.approx((row["top1"] - base["top1"]) * 100, abs=1e-3)
        if row.get("val_top1") is not None and base.get("val_top1") is not None:
            assert row["delta_val_top1_pt"] == pytest.approx((row["val_top1"] - base["val_top1"]) * 100, abs=1e-3)
    # the fastest artifact within the budget, and none outside it
    assert device["accuracy_budget_pt"] == BUDGET_PT
    timed = [r for r in device["results"] if r.get("latency")]
    key = _selection_key(timed)
    within = [r for r in timed if r.get(key) is not None and r[key] >= -BUDGET_PT]
    recommended = (device.get("recommendation") or {}).get("artifact")
    assert recommended == (min(within, key=lambda r: r["latency"]["p50_ms"])["artifact"] if within else None)
    assert recommended not in {r["artifact"] for r in timed if r.get(key) is not None and r[key] < -BUDGET_PT}
    md = (sweep_dir / "report.md").read_text()
    assert "## Trials" in md
    assert all(f"{k}={v}" in md for t in report["sweep"]["trials"] for k, v in t["overrides"].items())
    return report


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


@pytest.mark.slow
def test_local_sweep_reuses_the_shared_prefix_and_merges(tmp_path):
    from rich.console import Console

    sweep = Sweep.create(_sweep_recipe(tmp_path), tmp_path / "runs", ["stages.1.finetune.epochs=0,1"], None, None,
                         "local", None, None, None)
    run_sweep(sweep, Console(quiet=True))
    _check_merged(sweep.dir, 2)
    first, second = (_manifest(sweep.dir / "trials" / t) for t in ("t000", "t001"))
    assert not any(e.get("reused_from") for e in first["steps"].values())
    # the second trial differs from the first only in stage 1: baseline and prune come from the cache
    assert second["steps"]["baseline"]["reused_from"] == "t000" and second["steps"]["01-prune"]["reused_from"] == "t000"
    assert not second["steps"]["02-finetune"].get("reused_from")
    assert second["steps"]["baseline"]["sha256"] == first["steps"]["baseline"]["sha256"]
    report = json.loads((sweep.dir / "trials" / "t001" / "report.json").read_text())
    assert report["stages"][0]["top1"] == json.loads((sweep.dir / "trials" / "t000" / "report.json").read_text())["stages"][0]["top1"]
    assert any("reused from the sweep's cache" in n for n in report["stages"][0]["notes"])
    # one baseline checkpoint, so one baseline stage in the merged report, shared by both trials
    merged = json.loads((sweep.dir / "report.json").read_text())
    (baseline,) = [s for s in merged["stages"] if s["name"].endswith("baseline")]
    assert baseline["name"] == "baseline" and "t000" in baseline["notes"][0] and "t001" in baseline["notes"][0]


@pytest.mark.slow
def test_a_sweep_over_training_measures_each_trial_against_its_own_baseline(tmp_path):
    from rich.console import Console

    # two baselines (the learning rate), each pruned with and without fine-tuning; not fine-tuned, the pruned
    # models are far out of the budget
    recipe = _sweep_recipe(tmp_path, [{"prune": {"macs_reduction": 1.3, "round_to": 8, "epochs": 0, "lr": 0.05}}],
                           train={"epochs": 8, "batch_size": 32})
    sweep = Sweep.create(recipe, tmp_path / "runs", ["train.lr=0.05,0.1", "stages.0.prune.epochs=0,4"], None, None,
                         "local", None, None, None)
    run_sweep(sweep, Console(quiet=True))
    report = _check_merged(sweep.dir, 4)
    own = {t: json.loads((sweep.dir / "trials" / t / "report.json").read_text())["stages"][0]
           for t in ("t000", "t001", "t002", "t003")}
    assert own["t000"]["top1"] != own["t002"]["top1"]  # the grid changed the baseline
    assert own["t001"] == {**own["t000"], "notes": own["t001"]["notes"]}  # the same lr: reused from the cache
    baselines = {s["name"]: s for s in report["stages"] if s["name"].endswith("baseline")}
    assert set(baselines) == {"baseline", "t002/baseline"}
    assert (baselines["baseline"]["top1"], baselines["t002/baseline"]["top1"]) == (own["t000"]["top1"],
                                                                                   own["t002"]["top1"])
    assert baselines["t002/baseline"]["checkpoint"] == "trials/t002/" + own["t002"]["checkpoint"]
    assert "t000" in baselines["baseline"]["notes"][0] and "t001" in baselines["baseline"]["notes"][0]
    (device,) = report["devices"]
    timed = [r for r in device["results"] if r.get("latency")]
    key = _selection_key(timed)
    assert any(r.get(key) is not None and r[key] < -BUDGET_PT for r in timed)  # the budget decided something
    assert device["recommendation"] is not None


@pytest.mark.slow
def test_ray_sweep_of_six_trials(tmp_path):
    ray = pytest.importorskip("ray", reason="the ray backend needs the ray extra (pip install 'rescompress[ray]')")
    from rich.console import Console

    sweep = Sweep.create(_sweep_recipe(tmp_path), tmp_path / "runs",
                         ["stages.0.prune.macs_reduction=1.3,1.6", "stages.1.finetune.epochs=0,1,2"], None, None, "ray",
                         None, 1.0, None)
    assert len(sweep.trials) == 6
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_sweep(sweep, Console(quiet=True))
    finally:
        ray.shutdown()
    report = _check_merged(sweep.dir, 6)
    manifests = [_manifest(sweep.dir / "trials" / f"t{i:03d}") for i in range(6)]
    # the baseline was trained once; each pruning target once
    assert sum(not m["steps"]["baseline"].get("reused_from") for m in manifests) == 1
    assert sum(not m["steps"]["01-prune"].get("reused_from") for m in manifests) == 2
    assert len(report["artifacts"]) == 6 * 2  # torch-fp32 and onnx-fp32 per trial


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_redoing_finished_trials(tmp_path):
    recipe = _sweep_recipe(tmp_path)
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "rescompress", "sweep", str(recipe), "--grid",
                             "stages.1.finetune.epochs=0,1,2,3", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    sweep_file = None
    try:
        while time.time() < deadline:
            found = list(out.glob("*/sweep.json")) if out.exists() else []
            if found:
                sweep_file = found[0]
                done = [t for t in json.loads(sweep_file.read_text())["trials"] if t["status"] == "done"]
                if len(done) >= 2:
                    break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("two trials did not finish in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    sweep_dir = sweep_file.parent
    state = json.loads(sweep_file.read_text())["trials"]
    finished = [t["id"] for t in state if t["status"] == "done"]
    assert 2 <= len(finished) < 4
    stamps = {t: (sweep_dir / "trials" / t / "report.json").stat().st_mtime_ns for t in finished}
    logs = {t: (sweep_dir / "trials" / t / "logs" / "run.log").read_text() for t in finished}

    from typer.testing import CliRunner

    from rescompress.cli import app

    result = CliRunner().invoke(app, ["sweep", "--resume", str(sweep_dir)])
    assert result.exit_code == 0, result.output
    _check_merged(sweep_dir, 4)
    for t in finished:  # untouched: not re-run, not even re-reported
        assert (sweep_dir / "trials" / t / "report.json").stat().st_mtime_ns == stamps[t]
        assert (sweep_dir / "trials" / t / "logs" / "run.log").read_text() == logs[t]
