from __future__ import annotations

import copy
import io
import shutil

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from rich.console import Console

import rescompress.compress.prune  # noqa: F401  (registers the stage)
from rescompress.compress.prune import (
    PruneConfig,
    check_target,
    layout_summary,
    prune_model,
    reach_of,
    spread_epochs,
)
from rescompress.data import batches, load_dataset
from rescompress.errors import PlanError, RecipeError
from rescompress.models import build_model
from rescompress.models.layout import channel_layout, conform_to_state_dict
from rescompress.profile import count_macs
from rescompress.recipe import Recipe, TrainConfig, parse_recipe
from rescompress.stages import STAGES, StageContext

QUIET = Console(quiet=True)
X16 = torch.zeros(1, 1, 16, 16)
X16_RGB = torch.zeros(1, 3, 16, 16)
IMPORTANCES = ["l1", "l2", "taylor", "bn_scale", "lamp"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=16, limit_train=200, seed=0)


def tiny():
    torch.manual_seed(0)
    return build_model("resnet_tiny", num_classes=10, in_channels=1)


def resnet20():
    torch.manual_seed(0)
    return build_model("resnet20", num_classes=10, in_channels=3)


def grad_fn_from(digits):
    x, y = next(iter(batches(digits.train, digits.input_spec, 64)))

    def grad_fn(model):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model.eval()(x), y).backward()

    return grad_fn


def state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------- config


def test_config_defaults_to_half_the_macs():
    assert PruneConfig().macs_reduction == 2.0 and PruneConfig().channel_ratio is None
    cfg = PruneConfig(channel_ratio=0.25)
    assert cfg.macs_reduction is None and cfg.channel_ratio == 0.25


def test_config_refuses_both_targets():
    with pytest.raises(ValidationError, match="give either channel_ratio or macs_reduction, not both"):
        PruneConfig(channel_ratio=0.5, macs_reduction=2.0)
    with pytest.raises(RecipeError, match=r"stages\[0\]\.prune: give either channel_ratio or macs_reduction, not both"):
        parse_recipe({"stages": [{"prune": {"channel_ratio": 0.5, "macs_reduction": 2}}]})


@pytest.mark.parametrize("options", [{"channel_ratio": 1.0}, {"macs_reduction": 1.0}, {"round_to": 0},
                                     {"importance": "l3"}, {"scope": "local"}, {"alpha": 1.5}])
def test_config_ranges(options):
    with pytest.raises(ValidationError):
        PruneConfig(**options)


def test_spread_epochs():
    assert spread_epochs(5, 3) == [1, 2, 2] and spread_epochs(1, 3) == [0, 0, 1] and spread_epochs(4, 1) == [4]


# ----------------------------------------------------------------------------------------------- prune_model


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_each_importance_prunes_and_the_model_runs(importance, digits):
    model = tiny()
    before = channel_layout(model)
    grad_fn = grad_fn_from(digits) if importance == "taylor" else None
    info = prune_model(model, X16, importance=importance, scope="uniform", channel_ratio=0.5, round_to=4,
                       grad_fn=grad_fn)
    assert channel_layout(model) == {k: v // 2 for k, v in before.items()}
    assert info["macs_after"] == count_macs(model, X16) < info["macs_before"]
    assert model.eval()(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert all(p.grad is None for p in model.parameters())


def test_taylor_needs_gradients():
    with pytest.raises(ValueError, match="taylor importance needs grad_fn"):
        prune_model(tiny(), X16, importance="taylor", scope="uniform", channel_ratio=0.5)


@pytest.mark.parametrize("scope", ["uniform", "global"])
def test_macs_target_is_reached_with_aligned_channels(scope):
    model = resnet20()
    info = prune_model(model, X16_RGB, importance="l2", scope=scope, macs_reduction=2.0, round_to=8)
    assert info["reduction"] == info["macs_before"] / count_macs(model, X16_RGB)
    assert 2.0 <= info["reduction"] < 2.3  # round_to makes it stepwise, but no further than needed
    assert all(c % 8 == 0 for c in channel_layout(model).values())
    assert model.fc.out_features == 10
    assert model.eval()(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_uniform_and_global_channel_ratios():
    uniform, global_ = tiny(), tiny()
    before = channel_layout(uniform)
    prune_model(uniform, X16, importance="l2", scope="uniform", channel_ratio=0.5, round_to=1)
    assert channel_layout(uniform) == {k: v // 2 for k, v in before.items()}

    info = prune_model(global_, X16, importance="l2", scope="global", channel_ratio=0.5, round_to=1)
    roots = ["conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1", "layer3.0.conv2"]
    after = info["channels_after"]
    assert sum(after[r] for r in roots) == sum(before[r] for r in roots) // 2  # half of all channels, overall
    assert after != channel_layout(uniform)  # ranked across layers, not the same cut everywhere


def test_unreachable_target_names_the_best_reduction():
    model = tiny()
    before = channel_layout(model)
    with pytest.raises(PlanError, match=r"macs_reduction 4 cannot be reached with round_to 16: the most this model "
                                        r"can be pruned gives 1\.\d\dx .*use a smaller round_to or a macs_reduction"):
        prune_model(model, X16, importance="l2", scope="uniform", macs_reduction=4.0, round_to=16)
    assert channel_layout(model) == before  # checked before anything is pruned


def test_ratio_that_removes_nothing_is_refused():
    with pytest.raises(PlanError, match=r"channel_ratio 0\.1 with round_to 32 removes no channel"):
        prune_model(tiny(), X16, importance="l2", scope="uniform", channel_ratio=0.1, round_to=32)


@pytest.mark.parametrize("target", [{"macs_reduction": 2.0}, {"channel_ratio": 0.5}])
def test_iterative_steps(target):
    model, one_shot = tiny(), tiny()
    seen = []
    info = prune_model(model, X16, importance="l2", scope="uniform", round_to=4, iterative_steps=3,
                       on_step=lambda step, m: seen.append((step, count_macs(m, X16))), **target)
    assert [s for s, _ in seen] == [1, 2, 3]
    macs = [info["macs_before"]] + [m for _, m in seen]
    assert all(a >= b for a, b in zip(macs, macs[1:])) and macs[1] < macs[0]
    assert len(info["step_ratios"]) == 3 and info["macs_after"] == macs[-1]
    prune_model(one_shot, X16, importance="l2", scope="uniform", round_to=4, **target)
    assert channel_layout(model) == channel_layout(one_shot)  # the steps end where one step would


X32_RGB = torch.zeros(1, 3, 32, 32)


def test_check_target_gives_what_a_coarse_round_to_reaches():
    # every 16-channel layer of ResNet-20 keeps 8 or all 16 channels at round_to 8: 1.5x lands on 1.96x
    reach = check_target(PruneConfig(macs_reduction=1.5, round_to=8), resnet20(), X32_RGB)
    assert reach.reduction == pytest.approx(1.96, abs=0.005) and not reach.estimated
    assert reach.far and reach.miss == pytest.approx(0.31, abs=0.005)
    assert reach.describe() == "prune target 1.5× MACs → reaches 1.96× (round_to 8; 31% beyond the target)"
    assert reach.note().startswith("prune target missed: asked 1.5× MACs, reached 1.96× — 31% beyond the target")
    assert "a smaller round_to lands closer" in reach.note()


def test_check_target_is_what_the_stage_reaches():
    for cfg in (PruneConfig(macs_reduction=1.5, round_to=8), PruneConfig(macs_reduction=2.0, round_to=8),
                PruneConfig(channel_ratio=0.3, round_to=8), PruneConfig(macs_reduction=1.5, round_to=8, iterative_steps=2)):
        reach = check_target(cfg, resnet20(), X32_RGB)
        model = resnet20()
        info = prune_model(model, X32_RGB, importance="l1", scope="uniform", channel_ratio=cfg.channel_ratio,
                           macs_reduction=cfg.macs_reduction, round_to=8, iterative_steps=cfg.iterative_steps)
        assert reach == reach_of(info), cfg  # uniform: the weights do not change where the target lands


def test_check_target_close_to_the_target_is_not_a_miss():
    reach = check_target(PruneConfig(macs_reduction=2.2, round_to=8), resnet20(), X32_RGB)
    assert 2.2 <= reach.reduction < 2.3 and not reach.far and reach.note() is None
    assert reach.describe() == f"prune target 2.2× MACs → reaches {reach.reduction:.2f}× (round_to 8)"
    ratio = check_target(PruneConfig(channel_ratio=0.3, round_to=8), resnet20(), X32_RGB)
    assert ratio.describe().startswith("prune target channel_ratio 0.3 → reaches 43% of the channels removed, ")
    glob = check_target(PruneConfig(macs_reduction=2.0, round_to=8, scope="global"), resnet20(), X32_RGB)
    assert glob.estimated and "reaches about " in glob.describe() and "global scope" in glob.describe()


def test_plan_shows_what_the_prune_target_reaches():
    from rescompress.pipeline import make_plan

    recipe = parse_recipe({"name": "r20", "model": {"name": "resnet20"},
                           "data": {"name": "digits", "image_size": 32, "channels": 3, "limit_train": 100},
                           "stages": [{"prune": {"macs_reduction": 1.5, "round_to": 8}}],
                           "export": [{"onnx": {"precision": "fp32"}}], "devices": ["host-cpu"]}, "r20.yaml")
    lines = make_plan(recipe).describe().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("01-prune"))
    assert lines[at + 1].strip() == "prune target 1.5× MACs → reaches 1.96× (round_to 8; 31% beyond the target)"


def test_stage_notes_a_target_it_lands_far_from(tmp_path):
    digits32 = load_dataset("digits", image_size=32, channels=3, limit_train=64, seed=0)
    model = resnet20()
    ctx = stage_context(digits32, model, tmp_path)
    out = STAGES.get("prune").run(model, PruneConfig(macs_reduction=1.5, round_to=8, epochs=0), ctx)
    assert count_macs(resnet20(), X32_RGB) / count_macs(out, X32_RGB) == pytest.approx(1.96, abs=0.005)
    assert len(ctx.notes) == 2 and ctx.notes[0].startswith("l2 uniform pruning, round_to 8")
    assert ctx.notes[1].startswith("prune target missed: asked 1.5× MACs, reached 1.96× — 31% beyond the target")


# ----------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("build, example", [(tiny, X16), (resnet20, X16_RGB)])
def test_pruned_checkpoint_reloads_from_a_plain_state_dict(build, example, tmp_path):
    model = build()
    prune_model(model, example, importance="l2", scope="global", channel_ratio=0.4, round_to=1)
    torch.save(model.state_dict(), tmp_path / "pruned.pt")

    state = torch.load(tmp_path / "pruned.pt", weights_only=True)
    fresh = build()
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(state)
    conform_to_state_dict(fresh, state).load_state_dict(state)
    assert channel_layout(fresh) == channel_layout(model)
    x = torch.randn(3, *example.shape[1:])
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_conform_keeps_layer_settings():
    model = resnet20()
    state = {k: v for k, v in model.state_dict().items()}
    state["layer2.0.conv1.weight"] = torch.randn(24, 16, 3, 3)
    for key in ("weight", "bias", "running_mean", "running_var"):
        state[f"layer2.0.bn1.{key}"] = torch.ones(24)
    state["layer2.0.conv2.weight"] = torch.randn(32, 24, 3, 3)
    conform_to_state_dict(model, state).load_state_dict(state)
    conv = model.layer2[0].conv1
    assert (conv.in_channels, conv.out_channels, conv.stride, conv.padding, conv.bias) == (16, 24, (2, 2), (1, 1), None)
    assert model.layer2[0].bn1.num_features == 24 and model.layer2[0].bn1.eps == 1e-5
    assert model.layer2[0].downsample[0].kernel_size == (1, 1)  # untouched layers stay the same objects' shapes


def test_layout_summary():
    before = {"conv1": 16, "layer1.0.conv1": 16, "layer1.0.conv2": 16, "layer2.0.conv1": 32}
    after = {"conv1": 8, "layer1.0.conv1": 8, "layer1.0.conv2": 8, "layer2.0.conv1": 32}
    assert layout_summary(before, after) == "conv1 16→8; layer1 16→8 ×2; layer2 32"


# ----------------------------------------------------------------------------------------------- the stage


def stage_context(digits, model, work_dir, console=QUIET) -> StageContext:
    recipe = Recipe(train=TrainConfig(epochs=1, batch_size=64, lr=0.05))
    return StageContext(recipe=recipe, data=digits, work_dir=work_dir, console=console, seed=0, index=1,
                        teacher=copy.deepcopy(model).eval())


@pytest.mark.parametrize("distill", [False, True])
def test_stage_prunes_and_finetunes(distill, digits, tmp_path):
    model = tiny()
    ctx = stage_context(digits, model, tmp_path)
    cfg = PruneConfig(importance="taylor", channel_ratio=0.5, round_to=8, epochs=1, distill=distill, taylor_batches=2)
    spec = STAGES.get("prune")
    assert spec.structural
    out = spec.run(model, cfg, ctx)
    assert not out.training and out.fc.out_features == 10
    assert channel_layout(out)["layer3.0.conv1"] == 16
    assert (tmp_path / "pruned-1.pt").is_file() and (tmp_path / "finetune-1.pt").is_file()
    state = torch.load(tmp_path / "finetune-1.pt", weights_only=True)
    assert state["epoch"] == 1
    assert [n.split(":")[0] for n in ctx.notes] == ["taylor uniform pruning, round_to 8", "prune target missed"]
    # the 8-channel layers cannot go below round_to: 43 % of the channels go, not half
    assert "asked channel_ratio 0.5, reached 43% of the channels removed" in ctx.notes[1]
    assert "14% short of the target" in ctx.notes[1]
    assert "layer3 32→16 ×3" in ctx.notes[0] and ("distillation" in ctx.notes[0]) == distill


def test_stage_resumes_from_the_saved_structure(digits, tmp_path):
    cfg = PruneConfig(scope="global", macs_reduction=1.5, round_to=8, iterative_steps=2, epochs=2)
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full_dir.mkdir()
    model = tiny()
    full = STAGES.get("prune").run(model, cfg, stage_context(digits, model, full_dir))
    step1 = torch.load(full_dir / "pruned-1.pt", weights_only=True)
    step1_layout = {k[: -len(".weight")]: v.shape[0] for k, v in step1.items() if v.dim() == 4}
    assert step1_layout != channel_layout(full)  # step 2 pruned further

    # as if killed after step 1's fine-tuning: keep only step 1's files
    shutil.copytree(full_dir, resumed_dir, ignore=shutil.ignore_patterns("*-2.pt"))
    log = io.StringIO()
    model = tiny()
    ctx = stage_context(digits, model, resumed_dir, console=Console(file=log, width=200))
    resumed = STAGES.get("prune").run(model, cfg, ctx)
    assert "pruning step 1/2 was done earlier; rebuilding it from pruned-1.pt" in log.getvalue()
    assert channel_layout(resumed) == channel_layout(full)
    assert state_equal(resumed, full)
