"""Training devices and precision, checked on the CPU: device resolution and its errors (CUDA simulated by
patching torch.cuda), recipe validation, autocast and GradScaler wiring, channels_last, moving models and
PT2E graphs (to the meta device as a stand-in for a GPU), the BatchNorm-mode and conv-bn checks, SyncBatchNorm
undo, and the device a Ray sweep trial gets. tests/test_cuda.py runs the real thing where a GPU exists."""

from __future__ import annotations

import copy
import math
import os
import warnings

import pytest
import torch
from rich.console import Console

from rescompress import accel
from rescompress.errors import RecipeError, RescompressError
from rescompress.models import build_model
from rescompress.recipe import TrainConfig
from rescompress.train import evaluate, fit
from tests.conftest import TINY_RECIPE, make_ctx, write_recipe

QUIET = Console(quiet=True)


def _tiny():
    torch.manual_seed(0)
    return build_model("resnet_tiny", num_classes=10, in_channels=1, small_input=True)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)


# ------------------------------------------------------------------------------------------ resolution


def test_cpu_and_auto_without_cuda(no_cuda):
    assert accel.resolve_device("cpu") == torch.device("cpu")
    assert accel.resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("built, says", [(None, "a CPU-only build"), ("12.4", "built with CUDA 12.4")])
def test_cuda_without_a_gpu_says_what_torch_sees(no_cuda, monkeypatch, built, says):
    monkeypatch.setattr(torch.version, "cuda", built)
    with pytest.raises(accel.DeviceError, match="torch sees no CUDA GPU") as err:
        accel.resolve_device("cuda")
    assert says in str(err.value) and f"torch {torch.__version__}" in str(err.value)
    assert "0 CUDA device(s) visible" in str(err.value) and "train.device: cpu" in str(err.value)
    assert issubclass(accel.DeviceError, RescompressError)  # the CLI prints it and exits 2


def test_cuda_index_beyond_the_count(two_gpus):
    assert accel.resolve_device("auto") == torch.device("cuda", 0)
    assert accel.resolve_device("cuda") == torch.device("cuda", 0)
    assert accel.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(accel.DeviceError, match=r"'cuda:2' but torch sees only 2 CUDA device\(s\), cuda:0..cuda:1"):
        accel.resolve_device("cuda:2")


def test_torchrun_ranks_take_their_local_gpu(two_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert accel.resolve_device("auto") == torch.device("cuda", 1)
    assert accel.resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(accel.DeviceError, match="each rank trains on its own GPU"):
        accel.resolve_device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(accel.DeviceError, match="local rank 2, but torch sees 2 CUDA device"):
        accel.resolve_device("cuda")
    assert accel.resolve_device("cpu") == torch.device("cpu")


def test_bf16_needs_ampere(two_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(accel.DeviceError, match=r"bf16 needs .*Ampere.*Tesla T4 has 7\.5: use fp16"):
        accel.check_train(TrainConfig(device="cuda", precision="bf16"))
    assert accel.check_train(TrainConfig(device="cuda", precision="fp16")) == torch.device("cuda", 0)
    accel.check_precision(torch.device("cpu"), "bf16")  # bf16 on a CPU is allowed (slow without AMX)


@pytest.mark.parametrize("train, match", [({"device": "gpu"}, "device"), ({"device": "cuda:x"}, "device"),
                                          ({"precision": "int8"}, "precision"), ({"channels_last": "maybe"}, "channels_last")])
def test_recipe_refuses_bad_device_and_precision(train, match):
    from rescompress.recipe import parse_recipe

    data = copy.deepcopy(TINY_RECIPE)
    data["train"].update(train)
    with pytest.raises(RecipeError, match=match):
        parse_recipe(data, "test")


def test_plan_refuses_cuda_where_there_is_none(tmp_path, no_cuda):
    from typer.testing import CliRunner

    from rescompress.cli import app

    data = copy.deepcopy(TINY_RECIPE)
    data["train"]["device"] = "cuda"
    path = write_recipe(tmp_path / "r.yaml", data)
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "runs"), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "torch sees no CUDA GPU" in result.output


# ------------------------------------------------------------------------------------------ precision


@pytest.fixture(scope="module")
def digits():
    from rescompress.data import load_dataset

    return load_dataset("digits", limit_train=128, seed=0)


def _recording_loss(seen: dict):
    import torch.nn.functional as F

    def loss_fn(model, x, y):
        logits = model(x)
        seen.setdefault("dtypes", set()).add(logits.dtype)
        seen["channels_last"] = x.is_contiguous(memory_format=torch.channels_last)
        seen["model_channels_last"] = accel.is_channels_last(model)
        return F.cross_entropy(logits, y), logits

    return loss_fn


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_trains_one_epoch_with_a_finite_loss(digits, precision, dtype):
    seen: dict = {}
    model = _tiny()
    hist = fit(model, digits, TrainConfig(epochs=1, batch_size=32, device="cpu", precision=precision), console=QUIET,
               loss_fn=_recording_loss(seen))
    assert seen["dtypes"] == {dtype}
    assert math.isfinite(hist[0]["loss"]) and hist[0]["loss"] < 3.0
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: weights stay fp32


def test_fp16_scales_the_loss(digits, monkeypatch):
    steps = []

    class Counting(torch.amp.GradScaler):
        def step(self, optimizer, *args, **kwargs):
            steps.append(self.get_scale())
            return super().step(optimizer, *args, **kwargs)

    monkeypatch.setattr(accel, "grad_scaler", lambda device, precision: Counting(device.type) if precision == "fp16" else None)
    seen: dict = {}
    hist = fit(_tiny(), digits, TrainConfig(epochs=1, batch_size=32, device="cpu", precision="fp16"), console=QUIET,
               loss_fn=_recording_loss(seen))
    assert seen["dtypes"] == {torch.float16}
    assert len(steps) == math.ceil(len(digits.train) / 32) and steps[0] == 2.0**16
    assert math.isfinite(hist[0]["loss"])
    assert accel.grad_scaler(torch.device("cpu"), "bf16") is None


def test_channels_last_is_for_cuda_only(digits):
    """On the CPU, torch's convolution backward corrupts memory on channels_last tensors with few channels
    (an 8-channel stem at 224x224 crashes with a double free), so fit trains there in the default layout."""
    from rich.console import Console

    assert accel.use_channels_last(torch.device("cuda", 0), True) == (True, "")
    assert accel.use_channels_last(torch.device("cpu"), False) == (False, "")
    used, why = accel.use_channels_last(torch.device("cpu"), True)
    assert not used and "channels_last applies on CUDA only" in why
    seen: dict = {}
    console = Console(record=True, width=200, file=open(os.devnull, "w"))
    model = _tiny()
    fit(model, digits, TrainConfig(epochs=1, batch_size=32, device="cpu", channels_last=True), console=console,
        loss_fn=_recording_loss(seen))
    assert not seen["model_channels_last"]
    assert "channels_last applies on CUDA only" in console.export_text()
    assert all(p.is_contiguous() for p in model.parameters())


def test_a_model_moved_channels_last_comes_back_in_the_default_layout():
    model = _tiny()
    with accel.on_device(model, torch.device("cpu"), channels_last=True):
        assert accel.is_channels_last(model)
    assert not accel.is_channels_last(model) and all(p.is_contiguous() for p in model.parameters())


# ------------------------------------------------------------------------------------------ moving


def test_on_device_moves_the_teacher_and_comes_back_on_error(monkeypatch):
    model, teacher = _tiny(), _tiny()
    moves = []
    monkeypatch.setattr(accel, "move", lambda m, d, channels_last=False: moves.append(
        ("model" if m is model else "teacher", torch.device(d).type, channels_last)))
    with pytest.raises(KeyboardInterrupt):
        with accel.on_device(model, "meta", channels_last=True, extras=(teacher, None, model)):
            raise KeyboardInterrupt
    assert moves == [("model", "meta", True), ("teacher", "meta", True), ("model", "cpu", False), ("teacher", "cpu", False)]


def test_gradients_follow_their_parameters():
    model = _tiny()
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    accel.move(model, torch.device("cpu"), channels_last=True)
    model.to(torch.float64)  # a conversion that leaves .grad behind unless moved with the parameter
    accel.move(model, "cpu")
    assert all(p.grad is None or p.grad.device == p.device for p in model.parameters())


def test_graph_move_rewrites_device_constants_and_plain_attributes():
    """pytorch/pytorch#121761: a captured graph holds `device=cpu` in its nodes and tensors that are not
    buffers; Module.to moves neither."""
    import torch.fx

    class M(torch.nn.Module):
        def forward(self, x):
            return x + torch.zeros(x.shape[-1], device=torch.device("cpu"))

    gm = torch.fx.symbolic_trace(M())
    gm.constant = torch.ones(3)  # read by a get_attr node, like a torch.export constant (not a buffer)
    with warnings.catch_warnings(), gm.graph.inserting_before(next(n for n in gm.graph.nodes if n.op == "output")):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        warnings.simplefilter("ignore")  # fx asks for a buffer; a plain attribute is the point here
        const = gm.graph.get_attr("constant")
        total = gm.graph.call_function(torch.add, (out.args[0], const))
    out.args = (total,)
    gm.recompile()
    assert torch.equal(gm(torch.zeros(2, 3)), torch.ones(2, 3))
    assert accel.misplaced(gm, torch.device("cpu")) == []
    assert accel.misplaced(gm, torch.device("meta")) == ["constant on cpu", "node zeros device=cpu"]
    accel.move(gm, "meta")
    assert accel.misplaced(gm, torch.device("meta")) == []
    assert gm(torch.zeros(2, 3, device="meta")).device.type == "meta"  # runs there: nothing left on the CPU


def test_prepared_qat_graph_moves_with_its_fake_quantizers():
    """pytorch/pytorch#127783: the fake-quantize state of a prepared graph must go where the weights go."""
    from rescompress.compress import pt2e
    from rescompress.compress.schemes import ResNetQuantizer

    prepared = pt2e.prepare(_tiny(), torch.zeros(2, 1, 8, 8), ResNetQuantizer("tensorrt", qat=True), qat=True)
    fq = [m for m in prepared.modules() if type(m).__name__.endswith("FakeQuantize")]
    assert fq and accel.device_of(prepared).type == "cpu"
    accel.move(prepared, "meta")
    assert accel.misplaced(prepared, torch.device("meta")) == []
    assert all(b.device.type == "meta" for m in fq for b in m.buffers())


def test_prepare_checks_conv_bn_fusion_and_annotation():
    from rescompress.compress import pt2e
    from rescompress.compress.schemes import ResNetQuantizer

    example = torch.zeros(2, 1, 8, 8)
    for qat in (True, False):
        prepared = pt2e.prepare(_tiny(), example, ResNetQuantizer("onnxruntime", qat=qat), qat=qat)
        pt2e.check_prepared(prepared)  # passes: every pair fused, every weight observed
    raw = pt2e.capture(_tiny(), example, train=True)  # captured, never prepared
    with pytest.raises(RuntimeError, match=r"9 convolution\(s\) feed BatchNorm unfused.*9 convolution weight\(s\) have no observer"):
        pt2e.check_prepared(raw)
    kept = pt2e.prepare(_tiny(), example, ResNetQuantizer("onnxruntime", qat=False, keep_float=("conv1",)), qat=False,
                        keep_float=("conv1",))
    with pytest.raises(RuntimeError, match=r"1 convolution weight\(s\) have no observer"):
        pt2e.check_prepared(kept)


def test_a_batchnorm_mode_switch_the_pattern_misses_is_made_and_checked(monkeypatch):
    import torchao.quantization.pt2e as tq

    from rescompress.compress import pt2e

    graph = pt2e.capture(_tiny(), torch.zeros(2, 1, 8, 8), train=False)
    monkeypatch.setattr(tq, "move_exported_model_to_train", lambda m: m)  # as if the pattern matched nothing
    bound = pt2e.bind_modes(graph)
    bound.eval()
    bound.train()
    bns = pt2e._batch_norm_nodes(bound)
    assert len(bns) == 9 and all(n.args[5] is True for n in bns)
    stats = dict(bound.named_buffers())
    before = {k: v.clone() for k, v in stats.items() if "running_mean" in k}
    bound(torch.randn(4, 1, 8, 8))
    assert any(not torch.equal(before[k], stats[k]) for k in before)  # batch statistics really are used
    bound.eval()
    assert all(n.args[5] is False for n in pt2e._batch_norm_nodes(bound))
    bns[0].args = bns[0].args[:5]  # a BatchNorm node without a training argument cannot be switched
    with pytest.raises(RuntimeError, match=r"training mode left 1 BatchNorm node\(s\).*did not match"):
        bound.train()


def test_convert_runs_on_the_cpu(monkeypatch):
    from rescompress.compress import pt2e
    from rescompress.compress.schemes import ResNetQuantizer

    prepared = pt2e.prepare(_tiny(), torch.zeros(2, 1, 8, 8), ResNetQuantizer("tensorrt", qat=True), qat=True)
    moves = []
    real = accel.move
    monkeypatch.setattr(accel, "device_of", lambda m: torch.device("cuda", 0) if not moves else torch.device("cpu"))
    monkeypatch.setattr(accel, "move", lambda m, d, **kw: moves.append(str(d)) or real(m, "cpu"))
    converted = pt2e.convert(prepared)
    assert moves == ["cpu"] and pt2e.is_quantized(converted)


# ------------------------------------------------------------------------------------------ stages


def test_qat_in_bf16_trains_in_fp32_and_says_so(digits, tmp_path, monkeypatch):
    from rescompress.compress.quantize import QATConfig, qat
    from rescompress import train

    precisions = []
    real_fit = train.fit
    monkeypatch.setattr(train, "fit", lambda *a, **kw: precisions.append(kw.get("precision")) or real_fit(*a, **kw))
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["train"].update(precision="bf16", device="cpu")
    ctx = make_ctx(digits, tmp_path / "w", _tiny(), recipe=recipe)
    q = qat(_tiny(), QATConfig(scheme="tensorrt", epochs=1), ctx)
    assert precisions == ["fp32"]
    assert any("QAT trained in fp32, not train.precision bf16" in n for n in ctx.notes)
    assert accel.device_of(q).type == "cpu"


def test_kd_loss_lists_its_teacher():
    from rescompress.compress.distill import kd_loss

    teacher = _tiny()
    assert kd_loss(teacher, temperature=4.0, alpha=0.5).modules == (teacher,)


def test_dependency_graph_is_built_in_eval_mode_and_restores_train_mode():
    from rescompress.compress.prune import _groups

    model = _tiny().train()
    model.bn1.eval()  # a frozen BatchNorm keeps its own mode
    before = model.bn1.running_mean.clone(), model.layer1[0].bn1.running_mean.clone()
    _groups(model, torch.randn(4, 1, 8, 8))
    assert model.training and not model.bn1.training and model.layer1[0].bn1.training
    assert torch.equal(model.bn1.running_mean, before[0]) and torch.equal(model.layer1[0].bn1.running_mean, before[1])


def test_evaluate_puts_the_model_back(digits):
    model = _tiny()
    top1 = evaluate(model, digits.test, digits.input_spec, device="cpu", channels_last=True)
    assert 0.0 <= top1 <= 1.0 and not accel.is_channels_last(model)


# ------------------------------------------------------------------------------------------ ranks, sweeps


def test_sync_batchnorm_is_ignored_in_one_process_and_undone_exactly():
    from torch import nn

    from rescompress import distributed

    model = _tiny()
    same, note = distributed.use_sync_batchnorm(model)
    assert same is model and "ignored" in note
    keys = list(model.state_dict())
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(model.bn1, nn.SyncBatchNorm)
    weight = model.bn1.weight
    distributed.plain_batchnorm(model)
    assert type(model.bn1) is nn.BatchNorm2d and model.bn1.weight is weight
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def test_sync_batchnorm_in_fit_notes_why_it_is_ignored(digits):
    lines = []

    class Recording(Console):
        def print(self, *args, **kwargs):
            lines.append(" ".join(str(a) for a in args))

    fit(_tiny(), digits, TrainConfig(epochs=1, batch_size=64, device="cpu", sync_batchnorm=True),
        console=Recording(quiet=True))
    assert any("train.sync_batchnorm ignored" in line for line in lines)


@pytest.mark.parametrize("backend, gpus, device, expected", [
    ("ray", 1.0, "auto", "cuda"), ("ray", 0.5, "cuda:1", "cuda"), ("ray", 0.0, "auto", "cpu"),
    ("ray", 1.0, "cpu", "cpu"), ("local", 0.0, "auto", "auto"), ("local", 0.0, "cuda", "cuda")])
def test_a_ray_trial_trains_where_its_gpu_share_allows(backend, gpus, device, expected):
    from rescompress.recipe import SweepConfig
    from rescompress.sweep import trial_device

    assert trial_device(SweepConfig(backend=backend, gpus_per_trial=gpus), device) == expected


def test_a_ray_trial_without_a_gpu_refuses_cuda():
    from rescompress.recipe import SweepConfig
    from rescompress.sweep import trial_device

    with pytest.raises(RecipeError, match="gives each trial no GPU.*--gpus-per-trial 1"):
        trial_device(SweepConfig(backend="ray", gpus_per_trial=0.0), "cuda")


def test_sweep_trial_recipes_carry_the_device(tmp_path):
    from rescompress.sweep import Sweep

    data = copy.deepcopy(TINY_RECIPE)
    path = write_recipe(tmp_path / "r.yaml", data)
    sweep = Sweep.create(path, tmp_path / "out", ["train.lr=0.05,0.1"], None, None, "ray", None, 1.0, 1.0)
    recipes = [sweep.recipe(t) for t in sweep.trials]
    assert {r.train.device for r in recipes} == {"cuda"}
    assert sweep.keys(sweep.trials[0]) == sweep.keys(sweep.trials[0])  # what the scheduler and the trial compute
    cpu = Sweep.create(path, tmp_path / "out2", ["train.lr=0.05"], None, None, "ray", None, 1.0, 0.0)
    assert cpu.recipe(cpu.trials[0]).train.device == "cpu"
