"""Structural channel pruning with torch-pruning's dependency graph (DepGraph), and the `prune` stage.

Whole channels are removed, so MACs, parameters and latency drop. DepGraph finds the layers whose
channels are coupled (a residual stream, a conv and its BatchNorm, the next layer's inputs) and prunes
them together; each such *group* is scored by an importance criterion and loses its least important
channels. The classifier keeps its class count.

How many channels each group keeps, for a pruning ratio `r` (always relative to the unpruned model):

- `uniform`: every group keeps `(1 - r)` of its original channels;
- `global`: `r` of all channels go, ranked together across groups, so unimportant layers lose more;

then rounded *down* to a multiple of `round_to` (8 or 16 suit TensorRT's tensor cores), never below
`round_to` (a group narrower than `round_to` is left as it is). A MACs target is met by searching, by
bisection, the smallest ratio whose pruned model has at most `MACs / macs_reduction` MACs. Channel counts
move in steps of `round_to`, so the reduction reached is at or above the target and can be far above it:
ResNet-20 at 32² with `macs_reduction` 1.5 and `round_to` 8 reaches 1.96×, because its 16-channel layers
can only keep 8 or all 16. `check_target` gives, at plan time, the reduction a target will reach, and the
plan and the stage's notes say so when it lands more than 10 % off the target.

Iterative pruning reaches the target in `iterative_steps` equal steps (linear in the channel ratio, or
geometric in MACs), re-scoring the channels before each step, with an `on_step` callback after each one
(the stage fine-tunes there).

Devices: the stage prunes on the CPU and trains on `train.device`. The dependency graph is traced in eval
mode (no BatchNorm statistics move; each module's own mode is restored after), and channels are removed
from the CPU model; taylor importance computes its gradients on the device and they come back with the
parameters. Fine-tuning is `train.fit`, which moves the pruned model to the device and builds its optimizer
there for the parameters as they now are: no optimizer holds the pre-pruning tensors. `prune_model` itself
also works on a model that is on another device (the example batch follows the model).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rescompress.errors import PlanError
from rescompress.stages import StageContext, register_stage

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn

ImportanceName = Literal["l1", "l2", "taylor", "bn_scale", "lamp"]
Scope = Literal["global", "uniform"]
DEFAULT_MACS_REDUCTION = 2.0
_RATIO_TOLERANCE = 1e-5  # bisection stops when the ratio bracket is this narrow
TARGET_SLACK = 0.10  # a reached value further than this (relative) from the target is reported as a miss

# importance name -> (torch_pruning.importance class, constructor arguments)
IMPORTANCES: dict[str, tuple[str, dict[str, Any]]] = {
    "l1": ("GroupMagnitudeImportance", {"p": 1}),  # L1 norm of each channel's weights over the group
    "l2": ("GroupMagnitudeImportance", {"p": 2}),  # L2 norm, the same way
    "taylor": ("GroupTaylorImportance", {}),  # |weight × gradient|: needs gradients from training data
    "bn_scale": ("BNScaleImportance", {}),  # |BatchNorm scale| (network slimming)
    "lamp": ("LAMPImportance", {"p": 2}),  # layer-adaptive magnitude scores, comparable across layers
}


class PruneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    importance: ImportanceName = Field(
        "l2", description="how channels are scored: l1/l2 weight norm, taylor (weight × gradient), bn_scale, lamp")
    scope: Scope = Field(
        "uniform", description="uniform: every layer loses the same fraction; global: channels ranked across layers")
    channel_ratio: Optional[float] = Field(
        None, gt=0.0, lt=1.0,
        description="fraction of channels removed (per layer for uniform, overall for global); excludes macs_reduction")
    macs_reduction: Optional[float] = Field(
        None, gt=1.0, description="target MACs reduction factor (2.0 halves the MACs); default 2.0 unless channel_ratio is given")
    round_to: int = Field(
        8, ge=1, description="remaining channel counts are multiples of this (8 or 16 for TensorRT tensor cores)")
    iterative_steps: int = Field(1, ge=1, description="reach the target in this many pruning steps, fine-tuning after each")
    epochs: int = Field(5, ge=0, description="fine-tune epochs after pruning, spread over the iterative steps")
    lr: Optional[float] = Field(None, gt=0.0, description="fine-tune learning rate; default: a tenth of train.lr")
    distill: bool = Field(False, description="fine-tune with knowledge distillation from the unpruned model")
    temperature: float = Field(4.0, gt=0.0, description="distillation temperature (with distill)")
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="weight of the distillation loss against the labels (with distill)")
    taylor_batches: int = Field(8, ge=1, description="training batches whose gradients score channels for taylor importance")

    @model_validator(mode="after")
    def _one_target(self) -> "PruneConfig":
        if self.channel_ratio is not None and self.macs_reduction is not None:
            raise ValueError("give either channel_ratio or macs_reduction, not both")
        if self.channel_ratio is None and self.macs_reduction is None:
            self.macs_reduction = DEFAULT_MACS_REDUCTION
        return self


# ----------------------------------------------------------------------------------------------- pruning


def make_importance(name: str) -> Any:
    """The torch-pruning importance criterion behind a recipe name."""
    import torch_pruning as tp

    if name not in IMPORTANCES:
        raise ValueError(f"unknown importance '{name}' (choose from {', '.join(IMPORTANCES)})")
    cls, kwargs = IMPORTANCES[name]
    return getattr(tp.importance, cls)(**kwargs)


@dataclass
class _Groups:
    """One dependency graph of a model: its prunable groups by root layer name, with their channel counts."""

    groups: dict[str, Any]  # root module name -> torch_pruning Group holding all of its channels
    channels: dict[str, int]


@contextlib.contextmanager
def _eval_mode(model: "nn.Module") -> Iterator[None]:
    """Eval mode inside, each module's own train/eval mode restored after (frozen BatchNorm stays in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _groups(model: "nn.Module", example: "torch.Tensor") -> _Groups:
    import torch
    import torch_pruning as tp
    from torch import nn

    from rescompress.models.arch import classifier_name

    head = classifier_name(model)
    ignored = list(model.get_submodule(head).modules()) if head is not None else []
    from rescompress.accel import device_of

    example = example[:1].to(device_of(model))
    with _eval_mode(model), torch.enable_grad():  # no BatchNorm statistics updates; DepGraph traces autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    names = {m: n for n, m in model.named_modules()}
    groups: dict[str, Any] = {}
    channels: dict[str, int] = {}
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
        root = group[0].dep.target.module
        groups[names[root]] = group
        channels[names[root]] = len(group[0].idxs)
    return _Groups(groups, channels)


def _scores(found: _Groups, importance: Any) -> dict[str, "torch.Tensor"]:
    """Importance per channel of every group (groups the criterion cannot score are left unpruned)."""
    import torch

    out = {}
    for root, group in found.groups.items():
        imp = importance(group)
        if imp is not None:
            out[root] = torch.nan_to_num(imp.detach().float().cpu(), nan=0.0)
    return out


def _floor_to(x: float, step: int) -> int:
    return int(math.floor(x / step + 1e-9)) * step


def _keep_counts(channels: dict[str, int], scores: dict[str, "torch.Tensor"], original: dict[str, int], *,
                 ratio: float, scope: str, round_to: int) -> dict[str, int]:
    """Channels each scored group keeps at `ratio` (relative to the `original` counts)."""
    import torch

    roots = list(scores)
    if scope == "uniform":
        wanted = {r: _floor_to(original.get(r, channels[r]) * (1 - ratio), round_to) for r in roots}
    else:
        total_original = sum(original.get(r, channels[r]) for r in roots)
        n_remove = sum(channels[r] for r in roots) - math.floor(total_original * (1 - ratio) + 1e-9)
        removed = torch.zeros(len(roots), dtype=torch.long)
        if n_remove > 0:
            owner = torch.cat([torch.full((channels[r],), i, dtype=torch.long) for i, r in enumerate(roots)])
            lowest = torch.argsort(torch.cat([scores[r] for r in roots]), stable=True)[:n_remove]
            removed = torch.bincount(owner[lowest], minlength=len(roots))
        wanted = {r: _floor_to(channels[r] - int(removed[i]), round_to) for i, r in enumerate(roots)}
    return {r: min(channels[r], max(wanted[r], round_to)) for r in roots}


def _prune_groups(found: _Groups, keep: dict[str, int], scores: dict[str, "torch.Tensor"]) -> None:
    """Remove, in each group, its lowest-scored channels down to `keep[root]`."""
    import torch

    for root, kept in keep.items():
        n = found.channels[root] - kept
        if n > 0:
            found.groups[root].prune(idxs=torch.argsort(scores[root], stable=True)[:n].tolist())


class _Step:
    """One pruning step: the model's scored groups, and the channel counts and MACs that a ratio gives."""

    def __init__(self, model: "nn.Module", example: "torch.Tensor", criterion: Any, original: dict[str, int], *,
                 scope: str, round_to: int) -> None:
        self.model, self.example, self.original = model, example, original
        self.scope, self.round_to = scope, round_to
        self.found = _groups(model, example)
        self.scores = _scores(self.found, criterion)
        self._trials: dict[tuple, tuple[int, dict[str, int]]] = {}

    def keep(self, ratio: float) -> dict[str, int]:
        return _keep_counts(self.found.channels, self.scores, self.original, ratio=ratio, scope=self.scope,
                            round_to=self.round_to)

    def removes_nothing(self, ratio: float) -> bool:
        return self.keep(ratio) == {r: self.original.get(r, self.found.channels[r]) for r in self.scores}

    def trial(self, ratio: float) -> tuple[int, dict[str, int]]:
        """(MACs, channel layout) after pruning at `ratio`, measured on a pruned copy on the meta device (shapes
        without arithmetic: several times faster than computing), memoised per set of channel counts."""
        from rescompress.models.layout import channel_layout
        from rescompress.profile import count_macs

        keep = self.keep(ratio)
        key = tuple(sorted(keep.items()))
        if key not in self._trials:
            trial, example = copy.deepcopy(self.model).to("meta"), self.example.to("meta")
            _prune_groups(_groups(trial, example), keep, self.scores)
            self._trials[key] = (count_macs(trial, example), channel_layout(trial))
        return self._trials[key]

    def macs(self, ratio: float) -> int:
        """MACs after pruning at `ratio`."""
        return self.trial(ratio)[0]

    def prune(self, ratio: float) -> None:
        _prune_groups(self.found, self.keep(ratio), self.scores)


def _smallest_ratio(macs_at: Callable[[float], int], target: float, low: float) -> float:
    """The smallest ratio in [low, 1] whose pruned model has at most `target` MACs (macs_at(1.0) must do)."""
    if macs_at(low) <= target:
        return low
    high = 1.0
    while high - low > _RATIO_TOLERANCE:
        mid = (low + high) / 2
        if macs_at(mid) <= target:
            high = mid
        else:
            low = mid
    return high


def _check_reachable(macs0: int, macs_min: int, reduction: float, round_to: int) -> None:
    best = macs0 / macs_min
    if best < reduction:
        most = math.floor(best * 100) / 100
        raise PlanError(
            f"macs_reduction {reduction:g} cannot be reached with round_to {round_to}: the most this model can be "
            f"pruned gives {most:.2f}x ({macs0:,} -> {macs_min:,} MACs); use a smaller round_to or a macs_reduction "
            f"of at most {most:.2f}"
        )


def _drop_gradients(model: "nn.Module") -> None:
    for p in model.parameters():
        p.grad = None


def _check_gradients(model: "nn.Module") -> None:
    from torch import nn

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.grad is None:
            raise PlanError(f"taylor importance needs gradients of every layer, and {name} has none after grad_fn "
                            f"(is it frozen?); use importance l2, or unfreeze the model")


def prune_model(
    model: "nn.Module",
    example: "torch.Tensor",
    *,
    importance: str,
    scope: str,
    channel_ratio: Optional[float] = None,
    macs_reduction: Optional[float] = None,
    round_to: int = 8,
    iterative_steps: int = 1,
    grad_fn: Optional[Callable[["nn.Module"], None]] = None,
    on_step: Optional[Callable[[int, "nn.Module"], None]] = None,
    reference: Optional["nn.Module"] = None,
    first_step: int = 1,
) -> dict:
    """Prune `model` in place to `channel_ratio` or `macs_reduction` (exactly one); return what was done.

    `example` is one input batch (its shape sets the MACs). In each of `iterative_steps` steps the channels are
    re-scored (for taylor, `grad_fn(model)` is called first and must leave gradients on every layer), the
    step's share of the target is pruned, and `on_step(step, model)` is called (steps count from 1).

    To continue an interrupted schedule, pass the unpruned model as `reference` (targets are relative to it;
    default: `model` as given) and the step to start from as `first_step`.

    Raises PlanError when `macs_reduction` cannot be reached with this `round_to`, or when `channel_ratio`
    would remove nothing; both are checked before anything is pruned.
    """
    from rescompress.models.layout import channel_layout
    from rescompress.profile import count_macs, count_params

    if (channel_ratio is None) == (macs_reduction is None):
        raise ValueError("give exactly one of channel_ratio and macs_reduction")
    if channel_ratio is not None and not 0.0 < channel_ratio < 1.0:
        raise ValueError(f"channel_ratio must be between 0 and 1, got {channel_ratio}")
    if macs_reduction is not None and not macs_reduction > 1.0:
        raise ValueError(f"macs_reduction must be greater than 1, got {macs_reduction}")
    if scope not in ("uniform", "global"):
        raise ValueError(f"unknown scope '{scope}' (choose uniform or global)")
    if round_to < 1 or iterative_steps < 1 or first_step < 1:
        raise ValueError("round_to, iterative_steps and first_step must be at least 1")
    if importance == "taylor" and grad_fn is None:
        raise ValueError("taylor importance needs grad_fn to compute gradients before each step")
    criterion = make_importance(importance)

    from rescompress.accel import device_of

    reference = model if reference is None else reference
    example = example.to(device_of(model))
    original = channel_layout(reference)
    macs0, params0 = count_macs(reference, example.to(device_of(reference))), count_params(reference)
    step_ratios: list[float] = []
    for step in range(first_step, iterative_steps + 1):
        if grad_fn is not None and importance == "taylor":
            grad_fn(model)
            _check_gradients(model)
        plan = _Step(model, example, criterion, original, scope=scope, round_to=round_to)
        _drop_gradients(model)
        if macs_reduction is not None:
            _check_reachable(macs0, plan.macs(1.0), macs_reduction, round_to)
            target = macs0 / macs_reduction ** (step / iterative_steps)
            ratio = _smallest_ratio(plan.macs, target, step_ratios[-1] if step_ratios else 0.0)
        else:
            if plan.removes_nothing(channel_ratio):
                raise PlanError(f"channel_ratio {channel_ratio:g} with round_to {round_to} removes no channel: every "
                                f"layer would round back to its width; use a larger channel_ratio or a smaller round_to")
            ratio = channel_ratio * step / iterative_steps
        plan.prune(ratio)
        step_ratios.append(ratio)
        if on_step is not None:
            on_step(step, model)

    macs1 = count_macs(model, example)
    return {
        "importance": importance,
        "scope": scope,
        "round_to": round_to,
        "iterative_steps": iterative_steps,
        "channel_ratio": channel_ratio,
        "macs_reduction_target": macs_reduction,
        "ratio": step_ratios[-1] if step_ratios else None,
        "step_ratios": step_ratios,
        "macs_before": macs0,
        "macs_after": macs1,
        "params_before": params0,
        "params_after": count_params(model),
        "reduction": macs0 / macs1,
        "channels_before": original,
        "channels_after": channel_layout(model),
    }


@dataclass(frozen=True)
class TargetReach:
    """What a prune target reaches: the MACs reduction and the fraction of convolution channels removed."""

    channel_ratio: Optional[float]
    macs_reduction: Optional[float]
    round_to: int
    reduction: float  # MACs before / MACs after
    channels_removed: float  # fraction of all convolution output channels removed
    estimated: bool = False  # global scope at plan time: the ranking depends on the weights still to be trained

    @property
    def miss(self) -> float:
        """How far the reached value is from the target, relative to the target (0.31 = 31 % more)."""
        if self.macs_reduction is not None:
            return self.reduction / self.macs_reduction - 1
        return self.channels_removed / self.channel_ratio - 1

    @property
    def far(self) -> bool:
        return abs(self.miss) > TARGET_SLACK

    def target(self) -> str:
        return (f"{self.macs_reduction:g}× MACs" if self.macs_reduction is not None
                else f"channel_ratio {self.channel_ratio:g}")

    def reached(self) -> str:
        about = "about " if self.estimated else ""
        if self.macs_reduction is not None:
            return f"{about}{self.reduction:.2f}×"
        return f"{about}{self.channels_removed:.0%} of the channels removed, {self.reduction:.2f}× MACs"

    def describe(self) -> str:
        """For the plan, e.g. "prune target 1.5× MACs → reaches 1.96× (round_to 8; 31 % beyond the target)"."""
        why = f"round_to {self.round_to}"
        if self.far:
            why += f"; {abs(self.miss):.0%} {'beyond' if self.miss > 0 else 'short of'} the target"
        if self.estimated:
            why += "; global scope ranks the trained weights, so the run may differ"
        return f"prune target {self.target()} → reaches {self.reached()} ({why})"

    def note(self) -> Optional[str]:
        """A line for the stage's notes when the target was missed by more than TARGET_SLACK, else None."""
        if not self.far:
            return None
        return (f"prune target missed: asked {self.target()}, reached {self.reached()} — {abs(self.miss):.0%} "
                f"{'beyond' if self.miss > 0 else 'short of'} the target, because channel counts are multiples of "
                f"round_to {self.round_to} and never below it; a smaller round_to lands closer (the speed-up on the "
                f"device is what counts)")


def _channels_removed(before: dict[str, int], after: dict[str, int]) -> float:
    total = sum(before.values())
    return 1 - sum(after.get(name, n) for name, n in before.items()) / total if total else 0.0


def reach_of(info: dict) -> TargetReach:
    """The TargetReach of a `prune_model` result."""
    return TargetReach(channel_ratio=info["channel_ratio"], macs_reduction=info["macs_reduction_target"],
                       round_to=info["round_to"], reduction=info["reduction"],
                       channels_removed=_channels_removed(info["channels_before"], info["channels_after"]))


def check_target(cfg: PruneConfig, model: "nn.Module", example: "torch.Tensor") -> TargetReach:
    """Plan-time check that `cfg`'s target is reachable on `model` (the architecture as built, before any
    training), and what it will reach. Raises the same PlanError the stage would, before hours of baseline
    training.

    The most a model can lose, every group down to `round_to` channels, does not depend on its weights, and
    neither does what a `uniform` target reaches (every layer keeps the same share of its channels, however
    the iterative steps split it): that is exact. A `global` target ranks channels across layers by their
    trained weights, so what it reaches here, on the untrained ones, is an estimate."""
    from rescompress.models.layout import channel_layout
    from rescompress.profile import count_macs

    model = copy.deepcopy(model).eval()
    original = channel_layout(model)
    step = _Step(model, example, make_importance("l2"), original, scope=cfg.scope, round_to=cfg.round_to)
    macs0 = count_macs(model, example)
    if cfg.macs_reduction is not None:
        _check_reachable(macs0, step.macs(1.0), cfg.macs_reduction, cfg.round_to)
        ratio = _smallest_ratio(step.macs, macs0 / cfg.macs_reduction, 0.0)
    else:
        if step.removes_nothing(cfg.channel_ratio) and cfg.scope == "uniform":
            raise PlanError(f"channel_ratio {cfg.channel_ratio:g} with round_to {cfg.round_to} removes no channel: "
                            f"every layer would round back to its width; use a larger channel_ratio or a smaller "
                            f"round_to")
        ratio = cfg.channel_ratio
    macs1, layout = step.trial(ratio)
    return TargetReach(channel_ratio=cfg.channel_ratio, macs_reduction=cfg.macs_reduction, round_to=cfg.round_to,
                       reduction=macs0 / macs1, channels_removed=_channels_removed(original, layout),
                       estimated=cfg.scope == "global")


# ----------------------------------------------------------------------------------------------- reporting


def _si(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def layout_summary(before: dict[str, int], after: dict[str, int]) -> str:
    """Compact channel changes by top-level block, e.g. "conv1 16→8; layer1 16→8 ×6; layer2 32→16 ×7"."""
    blocks: dict[str, dict[tuple[int, int], int]] = {}
    for name, b in before.items():
        pairs = blocks.setdefault(name.split(".")[0], {})
        pair = (b, after.get(name, b))
        pairs[pair] = pairs.get(pair, 0) + 1
    parts = []
    for block, pairs in blocks.items():
        items = [(f"{b}→{a}" if a != b else f"{b}") + (f" ×{n}" if n > 1 else "") for (b, a), n in pairs.items()]
        parts.append(f"{block} {', '.join(items)}")
    return "; ".join(parts)


def describe(info: dict) -> str:
    """One line for the report: "l2 uniform pruning, round_to 8: MACs 40.8M → 18.3M (2.24×), params ..."."""
    steps = f", {info['iterative_steps']} steps" if info["iterative_steps"] > 1 else ""
    return (f"{info['importance']} {info['scope']} pruning, round_to {info['round_to']}{steps}: "
            f"MACs {_si(info['macs_before'])} → {_si(info['macs_after'])} ({info['reduction']:.2f}×), "
            f"params {_si(info['params_before'])} → {_si(info['params_after'])}; "
            f"channels {layout_summary(info['channels_before'], info['channels_after'])}")


# ----------------------------------------------------------------------------------------------- the stage


def spread_epochs(epochs: int, steps: int) -> list[int]:
    """Fine-tune epochs per step; the remainder goes to the last steps (the final model trains the most)."""
    base, extra = divmod(epochs, steps)
    return [base + (1 if i >= steps - extra else 0) for i in range(steps)]


def _pruned_file(work_dir: "Path", step: int) -> "Path":
    return work_dir / f"pruned-{step}.pt"


def _last_pruned_step(work_dir: "Path", steps: int) -> int:
    return max((s for s in range(1, steps + 1) if _pruned_file(work_dir, s).is_file()), default=0)


def restore_pruned(model: "nn.Module", path: "Path") -> "nn.Module":
    """`model`'s architecture with the layer widths and values of a saved pruned state_dict (weights only)."""
    import torch

    from rescompress.models.layout import conform_to_state_dict

    state = torch.load(path, map_location="cpu", weights_only=True)
    restored = conform_to_state_dict(copy.deepcopy(model), state)
    restored.load_state_dict(state)
    return restored


def _taylor_gradients(ctx: StageContext, batches_n: int) -> Callable[["nn.Module"], None]:
    """grad_fn for taylor importance: summed cross-entropy gradients over `batches_n` training batches,
    computed in fp32 on `train.device` (the gradients come back with the model).

    The model runs in eval mode, so scoring leaves its BatchNorm statistics as they are.
    """

    def grad_fn(model: "nn.Module") -> None:
        import torch
        import torch.nn.functional as F

        from rescompress.accel import on_device, train_device
        from rescompress.data import batches

        device = train_device(ctx.recipe.train)
        model.zero_grad(set_to_none=True)
        data = batches(ctx.data.train, ctx.data.input_spec, ctx.recipe.train.batch_size, shuffle=True,
                       seed=ctx.seed + ctx.index, device=device)
        with on_device(model, device), _eval_mode(model), torch.enable_grad():
            for x, y in itertools.islice(data, batches_n):
                F.cross_entropy(model(x), y).backward()

    return grad_fn


@register_stage("prune", PruneConfig, "remove whole channels (torch-pruning DepGraph), then fine-tune", structural=True)
def prune(model: "nn.Module", cfg: PruneConfig, ctx: StageContext) -> "nn.Module":
    """Prune, then fine-tune (with distillation from the unpruned model when `distill`).

    Resuming: after each pruning step the pruned state_dict is saved to `pruned-<step>.pt` in the work dir,
    before that step's fine-tuning (whose `fit` state, `finetune-<step>.pt`, resumes per epoch). A resumed
    stage rebuilds the structure of the last saved step from its file, finishes that step's fine-tuning and
    continues with the next step; targets stay relative to the unpruned model the stage was given.
    """
    import torch

    from rescompress.distributed import is_main
    from rescompress.fileio import atomic_write
    from rescompress.train import fit

    spec = ctx.data.input_spec
    example = torch.zeros(1, spec.channels, spec.height, spec.width)
    steps = cfg.iterative_steps
    epochs = spread_epochs(cfg.epochs, steps)
    lr = cfg.lr if cfg.lr is not None else ctx.recipe.train.lr / 10
    loss_fn = None
    if cfg.distill:
        from rescompress.compress.distill import kd_loss

        teacher = ctx.teacher if ctx.teacher is not None else copy.deepcopy(model).eval()
        loss_fn = kd_loss(teacher, temperature=cfg.temperature, alpha=cfg.alpha,
                          label_smoothing=ctx.recipe.train.label_smoothing)

    def finetune(step: int, m: "nn.Module") -> None:
        if epochs[step - 1] == 0:
            return
        of = f" step {step}/{steps}" if steps > 1 else ""
        fit(m, ctx.data, ctx.recipe.train, epochs=epochs[step - 1], lr=lr, seed=ctx.seed + ctx.index + step,
            console=ctx.console, state_path=ctx.work_dir / f"finetune-{step}.pt", loss_fn=loss_fn,
            desc=f"prune (stage {ctx.index}){of}")

    def on_step(step: int, m: "nn.Module") -> None:
        state = m.state_dict()
        if is_main():  # under torchrun only rank 0 writes
            atomic_write(_pruned_file(ctx.work_dir, step), lambda p: torch.save(state, p))
        finetune(step, m)

    reference = model
    done = _last_pruned_step(ctx.work_dir, steps)
    if done:
        path = _pruned_file(ctx.work_dir, done)
        ctx.console.print(f"[dim]prune: pruning step {done}/{steps} was done earlier; rebuilding it from {path.name}[/dim]")
        model = restore_pruned(reference, path)
        finetune(done, model)

    info = prune_model(
        model,
        example,
        importance=cfg.importance,
        scope=cfg.scope,
        channel_ratio=cfg.channel_ratio,
        macs_reduction=cfg.macs_reduction,
        round_to=cfg.round_to,
        iterative_steps=steps,
        grad_fn=_taylor_gradients(ctx, cfg.taylor_batches) if cfg.importance == "taylor" else None,
        on_step=on_step,
        reference=reference,
        first_step=done + 1,
    )
    tuned = f"; fine-tuned {cfg.epochs} epochs" if cfg.epochs else "; not fine-tuned"
    if cfg.epochs and cfg.distill:
        tuned += f" with distillation (T {cfg.temperature:g}, alpha {cfg.alpha:g})"
    ctx.notes.append(describe(info) + tuned)
    ctx.console.print(f"  {ctx.notes[-1]}")
    if (missed := reach_of(info).note()) is not None:
        ctx.notes.append(missed)
        ctx.console.print(f"  [yellow]{missed}[/yellow]")
    return model.eval()
