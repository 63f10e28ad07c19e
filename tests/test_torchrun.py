"""Training on several processes (gloo on CPU).

One training step of `fit` on two ranks, each on its half of the batch, must give exactly the parameters one
process gets from the whole batch: that holds only if DistributedDataParallel averages the gradients. Then
`torchrun --nproc-per-node 2 -m rescompress run RECIPE` end to end: rank 0 alone writes, and the result
lands in the same accuracy band as one process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from rescompress.report import validate_report
from tests.conftest import TINY_RECIPE, write_recipe


def _one_step_setup():
    """The tiny ResNet with frozen BatchNorm (running statistics, so a half batch normalises like the whole),
    64 digits images and a config whose one epoch is one SGD step over all of them."""
    from rescompress.data import load_dataset
    from rescompress.models import build_model
    from rescompress.recipe import TrainConfig

    torch.manual_seed(0)
    model = build_model("resnet_tiny", num_classes=10, in_channels=1, small_input=True)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
    data = load_dataset("digits", limit_train=64, seed=0)
    assert len(data.train) % 2 == 0
    cfg = TrainConfig(epochs=1, batch_size=len(data.train), lr=0.5, augment="none")
    return model, data, cfg


def _train_one_step_on_rank(rank: int, world_size: int, rendezvous: str, out: str) -> None:
    import torch.distributed as dist
    from rich.console import Console

    from rescompress import distributed
    from rescompress.train import fit

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world_size)
    try:
        assert distributed.world().size == world_size
        model, data, cfg = _one_step_setup()
        fit(model, data, cfg, seed=0, console=Console(quiet=True))
        torch.save(model.state_dict(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_one_step_on_two_ranks_equals_one_step_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp
    from rich.console import Console

    from rescompress.export.torch_eager import torch_threads
    from rescompress.train import fit

    out = str(tmp_path / "rank")
    mp.spawn(_train_one_step_on_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]

    model, data, cfg = _one_step_setup()
    start = copy.deepcopy(model.state_dict())
    with torch_threads(1):
        fit(model, data, cfg, seed=0, console=Console(quiet=True))
    whole = model.state_dict()

    moved = [k for k in whole if whole[k].is_floating_point() and not torch.equal(whole[k], start[k])]
    assert "fc.weight" in moved and "conv1.weight" in moved  # the step changed the weights
    bn = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(torch.equal(start[k], whole[k]) for k in whole if k.startswith(bn))  # frozen BatchNorm stayed put
    for rank, state in enumerate(ranks):
        for k in whole:
            torch.testing.assert_close(state[k], whole[k], atol=1e-6, rtol=0,
                                       msg=lambda m, k=k, rank=rank: f"rank {rank}, {k}: {m}")




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


@pytest.mark.slow
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
