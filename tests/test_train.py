from __future__ import annotations

import math

import pytest
import torch
from rich.console import Console

from rescompress.data import load_dataset
from rescompress.errors import PlanError, ResumeError
from rescompress.models import apply_freeze, build_model
from rescompress.recipe import TrainConfig
from rescompress.train import evaluate, fit, lr_at, predict, resolve_augment

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", limit_train=300, seed=0)


def tiny(digits):
    torch.manual_seed(0)
    return build_model("resnet_tiny", num_classes=10, in_channels=1)


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_lr_schedules(schedule):
    cfg = TrainConfig(schedule=schedule, warmup_epochs=1)
    lrs = [lr_at(s, 100, 0.1, cfg, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)  # linear warm-up over one epoch
    if schedule == "constant":
        assert set(lrs[10:]) == {0.1}
    else:
        assert lrs[-1] < 0.02 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_augment_follows_the_data(digits):
    assert resolve_augment(TrainConfig(), digits) == ("crop",)  # no flips for digits
    assert resolve_augment(TrainConfig(augment="none"), digits) == ()
    assert resolve_augment(TrainConfig(augment=["flip"]), digits) == ("flip",)


def test_fit_learns_and_is_deterministic(digits):
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05)
    a, b = tiny(digits), tiny(digits)
    before = evaluate(a, digits.test, digits.input_spec)
    hist = fit(a, digits, cfg, seed=3, console=QUIET)
    fit(b, digits, cfg, seed=3, console=QUIET)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4] and hist[-1]["loss"] < hist[0]["loss"]
    after = evaluate(a, digits.test, digits.input_spec)
    assert after > max(before, 0.5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    logits = predict(a, digits.test, digits.input_spec, batch_size=50)
    assert logits.shape == (len(digits.test), 10)


def test_resume_from_state_equals_uninterrupted(digits, tmp_path):
    import torch.nn.functional as F

    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05)
    full = tiny(digits)
    fit(full, digits, cfg, seed=1, console=QUIET)

    steps_per_epoch = math.ceil(len(digits.train) / cfg.batch_size)
    calls = {"n": 0}

    def dies_in_epoch_3(model, x, y):
        calls["n"] += 1
        if calls["n"] > 2 * steps_per_epoch + 1:
            raise KeyboardInterrupt  # stands in for the process being killed
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(digits), digits, cfg, seed=1, console=QUIET, state_path=state, loss_fn=dies_in_epoch_3)
    assert torch.load(state, weights_only=True)["epoch"] == 2

    resumed = tiny(digits)
    hist = fit(resumed, digits, cfg, seed=1, console=QUIET, state_path=state)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert all(torch.equal(x, y) for x, y in zip(full.state_dict().values(), resumed.state_dict().values()))


def test_corrupt_state_is_refused(digits, tmp_path):
    state = tmp_path / "state.pt"
    state.write_bytes(b"garbage")
    with pytest.raises(ResumeError, match=r"cannot resume from .*state\.pt.*Delete it"):
        fit(tiny(digits), digits, TrainConfig(epochs=1), console=QUIET, state_path=state)


def test_all_frozen_is_an_error(digits):
    model = tiny(digits)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(PlanError, match="every parameter is frozen"):
        fit(model, digits, TrainConfig(epochs=1), console=QUIET)


def test_frozen_backbone_keeps_bn_statistics(digits):
    model = tiny(digits)
    apply_freeze(model, "backbone")
    before = model.bn1.running_mean.clone()
    fc_before = model.fc.weight.detach().clone()
    fit(model, digits, TrainConfig(epochs=1, batch_size=64), console=QUIET)
    assert torch.equal(model.bn1.running_mean, before)
    assert not torch.equal(model.fc.weight, fc_before)


def test_divergence_is_reported(digits):
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        fit(tiny(digits), digits, TrainConfig(epochs=2, lr=1e6, optimizer="sgd"), console=QUIET)
