"""`torchrun --nproc-per-node 2 -m rescompress run RECIPE` on CPU (gloo): the two processes train one model
together, rank 0 alone writes, and the result lands in the same accuracy band as one process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from rescompress.report import validate_report
from tests.conftest import TINY_RECIPE, write_recipe

pytestmark = pytest.mark.slow


def _recipe(tmp_path):
    data = copy.deepcopy(TINY_RECIPE)
    data["data"] = {"name": "digits"}  # all of digits: enough for a stable top-1
    data["train"] = {"epochs": 8, "batch_size": 64, "lr": 0.05}
    data["stages"] = [{"prune": {"macs_reduction": 1.5, "round_to": 8, "epochs": 1}},
                      {"distill": {"teacher": "baseline", "epochs": 1}}, {"qat": {"epochs": 1}}]
    data["export"] = [{"onnx": {"precision": "fp32"}}, {"onnx": {"precision": "int8"}}]
    return write_recipe(tmp_path / "ddp.yaml", data)


def _run(args, out, env=None):
    proc = subprocess.run([sys.executable, *args, "run", str(out["recipe"]), "--out", str(out["dir"])],
                          capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = list(out["dir"].iterdir())  # one run directory, however many processes
    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    return run_dir, report, proc


def test_two_processes_train_together_and_match_one(tmp_path):
    recipe = _recipe(tmp_path)
    one_dir, one, _ = _run(["-m", "rescompress"], {"recipe": recipe, "dir": tmp_path / "one"})
    two_dir, two, proc = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "rescompress"], {"recipe": recipe, "dir": tmp_path / "two"},
                              env={"OMP_NUM_THREADS": "1"})

    log = (two_dir / "logs" / "run.log").read_text()
    assert "torchrun: 2 processes train together" in log
    assert log.count("baseline epoch 1/8") == 1  # rank 0 alone writes the log
    assert [s["name"] for s in two["stages"]] == ["baseline", "01-prune", "02-distill", "03-qat"]
    assert not list((two_dir / "checkpoints").glob("*.state.pt")) and not list((two_dir / "checkpoints").glob("*/"))
    arts = {a["name"]: a for a in two["artifacts"]}
    assert arts["onnx-int8"]["status"] == "ok" and arts["onnx-int8"]["top1"] is not None

    for name in ("baseline", "03-qat"):
        a = next(s for s in one["stages"] if s["name"] == name)["top1"]
        b = next(s for s in two["stages"] if s["name"] == name)["top1"]
        assert a > 0.85 and b > 0.85, (name, a, b)
        assert abs(a - b) <= 0.05, f"{name}: 1 process {a:.3f}, 2 processes {b:.3f}"
