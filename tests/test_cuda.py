"""Every training step on a CUDA GPU: fit in fp32/bf16/fp16 with and without channels_last, QAT with the
prepared graph on the GPU and the int8 graph converted on the CPU (linting like the CPU path's), PTQ
calibration, pruning with taylor importance, distillation with the teacher on the GPU, and a whole run.

Marked `cuda`: skipped where torch sees no GPU (`pytest -m cuda` or tools/gpu_check.sh on a GPU machine).
`RESCOMPRESS_CUDA_TESTS_ON=cpu` runs the same tests on the CPU instead, to check the tests themselves on a
machine without a GPU (it proves nothing about CUDA)."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from rescompress import accel, distributed
from rescompress.compress import pt2e
from rescompress.models import build_model
from rescompress.recipe import TrainConfig
from rescompress.train import evaluate, fit
from tests.conftest import TINY_RECIPE, make_ctx

DEVICE = os.environ.get("RESCOMPRESS_CUDA_TESTS_ON", "cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: torch sees none"),
]


def _quiet():
    from rich.console import Console

    return Console(quiet=True)


def _tiny():
    torch.manual_seed(0)
    return build_model("resnet_tiny", num_classes=10, in_channels=1, small_input=True)


def _recipe(device: str = DEVICE, **train) -> dict:
    data = copy.deepcopy(TINY_RECIPE)
    data["train"].update(device=device, **train)
    return data


@pytest.fixture
def trained_on(monkeypatch):
    """The devices `fit` trained on (the model's device when DDP would wrap it), in order."""
    seen: list[str] = []
    real = distributed.wrap
    monkeypatch.setattr(distributed, "wrap", lambda model: seen.append(accel.device_of(model).type) or real(model))
    return seen


def _on_cpu(model) -> bool:
    return accel.device_of(model).type == "cpu" and not accel.is_channels_last(model)


# ------------------------------------------------------------------------------------------------ fit


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_fit_on_the_device(digits_small, trained_on, precision, channels_last):
    import torch.nn.functional as F

    seen: dict = {"x": set(), "logits": set()}

    def loss_fn(model, x, y):
        logits = model(x)
        seen["x"].add((x.device.type, accel.is_channels_last(model)))
        seen["logits"].add(logits.dtype)
        return F.cross_entropy(logits, y), logits

    model = _tiny()
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.1, device=DEVICE, precision=precision, channels_last=channels_last)
    hist = fit(model, digits_small, cfg, seed=0, console=_quiet(), loss_fn=loss_fn)
    assert trained_on == [DEVICE.split(":")[0]]
    # batches and model on the device, in the layout asked for (channels_last applies on CUDA only)
    assert seen["x"] == {(DEVICE.split(":")[0], channels_last and DEVICE.startswith("cuda"))}
    assert seen["logits"] == {accel.PRECISIONS[precision]}
    assert all(math.isfinite(h["loss"]) for h in hist) and hist[-1]["loss"] < hist[0]["loss"]
    assert _on_cpu(model) and all(p.dtype == torch.float32 for p in model.parameters())
    spec = digits_small.input_spec
    here, there = evaluate(model, digits_small.test, spec), evaluate(model, digits_small.test, spec, device=DEVICE)
    assert here > 0.3 and abs(here - there) <= 0.01
    assert _on_cpu(model)


def test_resnet18_trains_a_step_in_bf16_channels_last(trained_on):
    """An ImageNet-shaped ResNet-18 at 64² RGB (cudnn's NHWC kernels, the residual adds under autocast)."""
    from rescompress.data import load_dataset

    data = load_dataset("digits", image_size=64, channels=3, limit_train=64, seed=0)
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=3, small_input=False)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.01, device=DEVICE, precision="bf16", channels_last=True)
    hist = fit(model, data, cfg, console=_quiet())
    assert math.isfinite(hist[0]["loss"]) and trained_on == [DEVICE.split(":")[0]] and _on_cpu(model)


def test_resume_from_a_state_written_on_the_device(digits_small, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=32, device=DEVICE)
    state = tmp_path / "state.pt"
    a = _tiny()
    fit(a, digits_small, cfg.model_copy(update={"epochs": 1}), seed=1, console=_quiet(), state_path=state)
    fit(a, digits_small, cfg, seed=1, console=_quiet(), state_path=state)  # resumes after epoch 1
    assert _on_cpu(a) and torch.load(state, map_location="cpu", weights_only=True)["epoch"] == 2


# ------------------------------------------------------------------------------------------------ PT2E


def test_prepared_graph_moves_switches_modes_and_computes_like_the_cpu(digits_small, trained_tiny):
    from rescompress.compress.schemes import ResNetQuantizer
    from rescompress.data import batches

    spec = digits_small.input_spec
    prepared = pt2e.prepare(copy.deepcopy(trained_tiny), torch.zeros(2, 1, 8, 8), ResNetQuantizer("tensorrt", qat=True),
                            qat=True)
    x, _ = next(iter(batches(digits_small.train, spec, 64)))
    pt2e.calibrate(prepared, [x])  # ranges from real data, so both devices fake-quantize alike
    with torch.no_grad():
        cpu_out = prepared.eval()(x)
    accel.move(prepared, DEVICE)
    assert accel.misplaced(prepared, accel.device_of(prepared)) == []
    prepared.train()  # torchao's BatchNorm rewrite on the device; bind_modes checks every node switched
    prepared.eval()
    with torch.no_grad():
        dev_out = prepared(x.to(DEVICE)).cpu()
    assert (dev_out.argmax(1) == cpu_out.argmax(1)).float().mean() >= 0.95


def test_prepare_a_model_that_is_on_the_device():
    """pytorch/pytorch#127783: fake-quantize state is created on the CPU; prepare hands the graph back on the
    model's device with every buffer there."""
    from rescompress.compress.schemes import ResNetQuantizer

    model = accel.move(_tiny(), DEVICE)
    prepared = pt2e.prepare(model, torch.zeros(2, 1, 8, 8), ResNetQuantizer("onnxruntime", qat=True), qat=True)
    device = accel.device_of(model)
    assert accel.device_of(prepared) == device and accel.misplaced(prepared, device) == []
    x = torch.randn(4, 1, 8, 8, device=device)
    with torch.no_grad():
        prepared.train()(x)  # observers set the fake-quantizers' ranges on the device
        assert prepared.eval()(x).device == device


def _int8_onnx_lint(q, data, path, scheme: str) -> dict:
    from rescompress.export.lint import lint_file
    from rescompress.export.onnx import OnnxConfig, export_onnx

    spec = data.input_spec
    export_onnx(q, torch.zeros(2, spec.channels, spec.height, spec.width), OnnxConfig(precision="int8"), path,
                spec=spec, from_stage="test")
    result = lint_file(path, scheme)  # the runtime the scheme's layout is for
    return {"passed": result.passed, "findings": sorted({(f.rule, f.severity) for f in result.findings})}


@pytest.mark.parametrize("scheme", ["tensorrt", "onnxruntime"])
def test_qat_trains_on_the_device_and_converts_like_the_cpu_path(digits_small, trained_tiny, tmp_path, trained_on, scheme):
    from rescompress.compress.quantize import QATConfig, qat

    cfg = QATConfig(scheme=scheme, epochs=2, distill=True)
    spec = digits_small.input_spec
    ctx = make_ctx(digits_small, tmp_path / "dev", trained_tiny, recipe=_recipe(precision="bf16", channels_last=True))
    q = qat(copy.deepcopy(trained_tiny), cfg, ctx)
    assert trained_on == [DEVICE.split(":")[0]]
    assert pt2e.is_quantized(q) and accel.device_of(q).type == "cpu"
    assert any("QAT trained in fp32" in n for n in ctx.notes)
    assert evaluate(q, digits_small.test, spec) >= evaluate(trained_tiny, digits_small.test, spec) - 0.05

    cpu_ctx = make_ctx(digits_small, tmp_path / "cpu", trained_tiny, recipe=_recipe("cpu"))
    q_cpu = qat(copy.deepcopy(trained_tiny), cfg, cpu_ctx)
    ops = lambda g: sorted(str(n.target) for n in g.graph.nodes if n.op == "call_function")  # noqa: E731
    assert ops(q) == ops(q_cpu)  # the same int8 graph, op for op
    dev_lint = _int8_onnx_lint(q, digits_small, tmp_path / "dev.onnx", scheme)
    cpu_lint = _int8_onnx_lint(q_cpu, digits_small, tmp_path / "cpu.onnx", scheme)
    assert dev_lint == cpu_lint and dev_lint["passed"], dev_lint


def test_ptq_calibrates_on_the_device(digits_small, trained_tiny, tmp_path):
    from rescompress.compress.quantize import PTQConfig, quantize_ptq

    Q = torch.ops.quantized_decomposed
    cfg = PTQConfig(calibration_batches=4)
    dev = quantize_ptq(copy.deepcopy(trained_tiny), make_ctx(digits_small, tmp_path / "a", trained_tiny, recipe=_recipe()),
                       cfg, "onnxruntime", observer="minmax")
    ref = quantize_ptq(copy.deepcopy(trained_tiny), make_ctx(digits_small, tmp_path / "b", trained_tiny, recipe=_recipe("cpu")),
                       cfg, "onnxruntime", observer="minmax")
    assert accel.device_of(dev).type == "cpu"
    scales = lambda g: [n.args[1] for n in g.graph.nodes if n.target == Q.quantize_per_tensor.default]  # noqa: E731
    # the same ranges, observed on the device (TF32 convolutions on the GPU round slightly differently)
    assert scales(dev) == pytest.approx(scales(ref), rel=2e-2)
    spec = digits_small.input_spec
    here, there = evaluate(dev, digits_small.test, spec), evaluate(dev, digits_small.test, spec, device=DEVICE)
    assert abs(here - there) <= 0.01  # the converted graph also runs on the device (its constants move)


# ------------------------------------------------------------------------------------------------ prune, distill


def test_prune_stage_scores_and_finetunes_on_the_device(digits_small, trained_tiny, tmp_path, trained_on):
    from rescompress.compress.prune import PruneConfig
    from rescompress.models.layout import channel_layout
    from rescompress.stages import STAGES

    ctx = make_ctx(digits_small, tmp_path, trained_tiny, recipe=_recipe())
    cfg = PruneConfig(importance="taylor", channel_ratio=0.5, round_to=8, epochs=2, iterative_steps=2, taylor_batches=2,
                      distill=True)
    out = STAGES.get("prune").run(copy.deepcopy(trained_tiny), cfg, ctx)
    assert trained_on == [DEVICE.split(":")[0]] * 2  # one fine-tune per step, each with a fresh optimizer
    assert _on_cpu(out) and channel_layout(out)["layer3.0.conv1"] == 16
    assert evaluate(out, digits_small.test, digits_small.input_spec) > 0.5


def test_prune_model_on_a_model_that_is_on_the_device():
    from rescompress.compress.prune import prune_model

    model = accel.move(_tiny(), DEVICE).train()
    info = prune_model(model, torch.zeros(2, 1, 8, 8), importance="l2", scope="uniform", channel_ratio=0.5, round_to=8)
    assert info["reduction"] > 1.5 and accel.device_of(model).type == DEVICE.split(":")[0] and model.training
    assert accel.misplaced(model, accel.device_of(model)) == []


@pytest.mark.parametrize("feature_weight", [0.0, 1.0], ids=["logits", "features"])
def test_distill_with_the_teacher_on_the_device(digits_small, trained_tiny, tmp_path, trained_on, feature_weight):
    from rescompress.compress.distill import DistillConfig, distill
    from rescompress.compress.prune import prune_model

    student = copy.deepcopy(trained_tiny)
    prune_model(student, torch.zeros(2, 1, 8, 8), importance="l2", scope="uniform", channel_ratio=0.5, round_to=8)
    ctx = make_ctx(digits_small, tmp_path, trained_tiny, recipe=_recipe(precision="bf16"))
    teacher_ran_on = set()
    ctx.teacher.register_forward_pre_hook(lambda m, args: teacher_ran_on.add(args[0].device.type))
    before = evaluate(student, digits_small.test, digits_small.input_spec)
    out = distill(student, DistillConfig(teacher="previous", epochs=3, lr=0.05, feature_weight=feature_weight), ctx)
    assert teacher_ran_on == {DEVICE.split(":")[0]} and trained_on == [DEVICE.split(":")[0]]
    assert _on_cpu(out) and accel.device_of(ctx.teacher).type == "cpu"
    assert evaluate(out, digits_small.test, digits_small.input_spec) > before + 0.2


# ------------------------------------------------------------------------------------------------ a whole run


def test_a_run_trains_on_the_device_and_exports_from_the_cpu(tmp_path):
    import json

    for module in ("matplotlib", "scipy"):  # report plots, latency estimates; tools/gpu_check.sh cannot carry them
        pytest.importorskip(module, reason=f"a whole run needs {module}, which is not installed here")

    from typer.testing import CliRunner

    from rescompress.cli import app
    from tests.conftest import write_recipe

    data = _recipe(precision="bf16", channels_last=True, epochs=2)
    data["stages"] = [{"prune": {"channel_ratio": 0.5, "round_to": 8, "epochs": 1}}, {"qat": {"scheme": "tensorrt", "epochs": 1}}]
    data["export"] = [{"onnx": {"precision": "fp32"}}, {"onnx": {"precision": "int8"}}]
    path = write_recipe(tmp_path / "r.yaml", data)
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "runs")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(next((tmp_path / "runs").glob("*/report.json")).read_text())
    int8 = next(a for a in report["artifacts"] if a["name"] == "onnx-int8")
    assert int8["status"] == "ok" and all(c["passed"] for c in int8["lint_checked"].values()), int8["lint_checked"]
    assert any("QAT trained in fp32" in n for s in report["stages"] for n in s.get("notes", []))


# ------------------------------------------------------------------------------------------------ two GPUs


def _ddp_rank(rank: int, world_size: int, rendezvous: str, out: str, sync_bn: bool) -> None:
    import torch.distributed as dist

    from rescompress.data import load_dataset

    os.environ.update(WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.cuda.set_device(rank)
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=rendezvous, rank=rank, world_size=world_size)
    try:
        data = load_dataset("digits", limit_train=64, seed=0)
        model = _tiny()
        cfg = TrainConfig(epochs=1, batch_size=64, lr=0.5, augment="none", device="cuda", sync_batchnorm=sync_bn)
        fit(model, data, cfg, seed=0, console=_quiet())
        assert _on_cpu(model) and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        torch.save(model.state_dict(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("sync_bn", [False, True], ids=["ddp", "sync_batchnorm"])
def test_two_ranks_on_two_gpus_with_nccl(tmp_path, sync_bn):
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank")
    mp.spawn(_ddp_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out, sync_bn), nprocs=2, join=True)
    a, b = (torch.load(f"{out}.{r}", weights_only=True) for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)  # one model on both ranks after the epoch
