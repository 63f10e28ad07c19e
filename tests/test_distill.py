"""Knowledge distillation on the tiny ResNet: the loss, the feature adapters, and each kind of teacher."""

from __future__ import annotations

import copy

import pytest
import torch

from rescompress.compress.distill import DistillConfig, _blend, _build_student, distill, kd_loss
from rescompress.compress.prune import prune_model
from rescompress.models import build_model
from rescompress.train import evaluate
from tests.conftest import make_ctx


def test_loss_is_cross_entropy_at_alpha_zero_and_kl_at_alpha_one():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(_blend(s, t, y, 4.0, 0.0, 0.0), ce)
    assert _blend(t, t, y, 4.0, 1.0, 0.0).abs() < 1e-6  # a student equal to its teacher has nothing to learn
    assert _blend(s, t, y, 4.0, 1.0, 0.0) > 0


def test_kd_loss_returns_the_students_logits(trained_tiny, digits_small):
    student = build_model("resnet_tiny", num_classes=10, in_channels=1, small_input=True)
    x = torch.randn(4, 1, 8, 8)
    loss, logits = kd_loss(trained_tiny, temperature=2.0, alpha=0.5)(student, x, torch.zeros(4, dtype=torch.long))
    assert loss.requires_grad and torch.equal(logits, student(x))


def test_adapters_bridge_pruned_widths(trained_tiny):
    student = copy.deepcopy(trained_tiny)
    prune_model(student, torch.zeros(2, 1, 8, 8), importance="l2", scope="uniform", channel_ratio=0.5, round_to=8)
    wrapper, names = _build_student(student, trained_tiny, torch.zeros(2, 1, 8, 8))
    assert names == ["layer1", "layer2", "layer3"]
    assert isinstance(wrapper.adapters["layer3"], torch.nn.Conv2d)
    assert (wrapper.adapters["layer3"].in_channels, wrapper.adapters["layer3"].out_channels) == (16, 32)
    assert isinstance(wrapper.adapters["layer1"], torch.nn.Identity)  # 8 channels stay 8 (round_to 8)


def _pruned(model):
    student = copy.deepcopy(model)
    prune_model(student, torch.zeros(2, 1, 8, 8), importance="l2", scope="uniform", channel_ratio=0.5, round_to=8)
    return student


def test_distill_stage_with_feature_loss_recovers_a_pruned_model(trained_tiny, digits_small, tmp_path):
    student = _pruned(trained_tiny)
    ctx = make_ctx(digits_small, tmp_path / "w", student)
    ctx.baseline = lambda: copy.deepcopy(trained_tiny)
    before = evaluate(student, digits_small.test, digits_small.input_spec)
    out = distill(student, DistillConfig(epochs=3, lr=0.05, feature_weight=1.0), ctx)
    assert out is student
    assert not any(m._forward_hooks for m in out.modules()), "feature hooks must not outlive the stage"
    assert "feature loss x1.0 on layer1, layer2, layer3" in ctx.notes[-1]
    torch.export.export(out.eval(), (torch.zeros(2, 1, 8, 8),), strict=True)  # still capturable for QAT
    assert evaluate(out, digits_small.test, digits_small.input_spec) > before + 0.3  # pruned ~26 %, distilled ~80 %


def test_previous_teacher_is_the_model_before_the_stage(trained_tiny, digits_small, tmp_path, monkeypatch):
    import rescompress.compress.distill as distill_module

    student = _pruned(trained_tiny)
    ctx = make_ctx(digits_small, tmp_path / "w", student)
    ctx.baseline = lambda: pytest.fail("the baseline must not be loaded for teacher: previous")
    seen = []
    real = distill_module.kd_loss
    monkeypatch.setattr(distill_module, "kd_loss", lambda teacher, **kw: seen.append(teacher) or real(teacher, **kw))
    distill(student, DistillConfig(teacher="previous", epochs=1), ctx)
    assert seen == [ctx.teacher]


def test_teacher_trained_in_the_run(digits_small, tmp_path):
    ctx = make_ctx(digits_small, tmp_path / "w")
    student = build_model("resnet_tiny", num_classes=10, in_channels=1, small_input=True)
    cfg = DistillConfig(teacher={"model": "resnet_tiny", "epochs": 1}, epochs=1)
    distill(student, cfg, ctx)
    assert (tmp_path / "w" / "teacher.pt").is_file()
    assert ctx.notes[0].startswith("teacher resnet_tiny (trained here for 1 epochs): test top-1")


def test_teacher_weights_must_exist(tmp_path):
    with pytest.raises(ValueError, match="teacher weights file not found"):
        DistillConfig(teacher={"model": "resnet20", "weights": str(tmp_path / "nope.pth")})
