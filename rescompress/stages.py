"""Pipeline stages: each registers a config class, a `run(model, cfg, ctx) -> model` function and the rules
that say what may follow it. The whole order is checked before the first epoch (`check_order`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field

from rescompress.errors import PlanError
from rescompress.registry import Registry

if TYPE_CHECKING:
    import torch
    import torch.nn as nn
    from rich.console import Console

    from rescompress.data import DatasetBundle
    from rescompress.recipe import Recipe


@dataclass
class StageContext:
    """What a stage may use besides the model: data, the recipe, where to write, how to report progress."""

    recipe: "Recipe"
    data: "DatasetBundle"
    work_dir: Path
    console: "Console"
    seed: int
    index: int
    arch: dict = field(default_factory=dict)  # build_model arguments of the run's model
    example: Optional["torch.Tensor"] = None  # a batch of 2 zeros in the input spec's shape (for graph capture)
    devices: list = field(default_factory=list)  # the recipe's DeviceProfiles, in order
    teacher: Optional["nn.Module"] = None  # the model as it was before this stage
    baseline: Optional[Callable[[], "nn.Module"]] = None  # loads the run's baseline model (a fresh copy)
    notes: list[str] = field(default_factory=list)  # shown beside the stage in the report
    record: dict = field(default_factory=dict)  # extra report fields: precision, scheme, calibration


@dataclass(frozen=True)
class StageSpec:
    name: str
    config: type[BaseModel]
    run: Callable[["nn.Module", Any, StageContext], "nn.Module"]
    summary: str
    structural: bool = False  # changes layer shapes (pruning)
    quantizes: bool = False  # leaves an int8 model; only stages with accepts_quantized may follow
    accepts_quantized: bool = False
    exclusive_with: tuple[str, ...] = ()
    check: Optional[Callable[[Any], None]] = None  # plan-time check of the config (e.g. an optional backend)


STAGES: Registry[StageSpec] = Registry("stage")


def register_stage(name: str, config: type[BaseModel], summary: str, **rules: Any) -> Callable:
    """Decorator: `@register_stage("finetune", FinetuneConfig, "...")` over `run(model, cfg, ctx) -> model`."""

    def deco(fn: Callable) -> Callable:
        STAGES.add(name, StageSpec(name=name, config=config, run=fn, summary=summary, **rules))
        return fn

    return deco


def check_order(kinds: list[str], configs: Optional[list[Any]] = None) -> None:
    """Raise PlanError naming the offending stages when the order is impossible (and run each stage's own
    plan-time check on its config when `configs` are given)."""
    specs = [STAGES.get(k) for k in kinds]
    if configs is not None:
        for spec, cfg in zip(specs, configs):
            if spec.check is not None:
                spec.check(cfg)
    for i, spec in enumerate(specs):
        for j, other in enumerate(specs[:i]):
            if spec.name in other.exclusive_with or other.name in spec.exclusive_with:
                raise PlanError(
                    f"stages[{j}] {other.name} and stages[{i}] {spec.name} are exclusive: keep one of them"
                )
            if other.quantizes and not spec.accepts_quantized:
                what = "nothing structural" if spec.structural else f"no {spec.name}"
                raise PlanError(
                    f"stages[{i}] {spec.name} cannot follow stages[{j}] {other.name}: {what} after int8 "
                    f"quantization; move {spec.name} before {other.name}"
                )


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(3, ge=0)
    lr: Optional[float] = Field(None, gt=0.0, description="default: a tenth of train.lr")


@register_stage("finetune", FinetuneConfig, "train the current model further at a lower learning rate")
def finetune(model: "nn.Module", cfg: FinetuneConfig, ctx: StageContext) -> "nn.Module":
    from rescompress.train import fit

    lr = cfg.lr if cfg.lr is not None else ctx.recipe.train.lr / 10
    fit(
        model,
        ctx.data,
        ctx.recipe.train,
        epochs=cfg.epochs,
        lr=lr,
        seed=ctx.seed + ctx.index + 1,
        console=ctx.console,
        state_path=ctx.work_dir / "train-state.pt",
        desc=f"finetune (stage {ctx.index})",
    )
    return model


from rescompress.compress import distill as _distill  # noqa: E402,F401  (each registers its stage)
from rescompress.compress import prune as _prune  # noqa: E402,F401
from rescompress.compress import quantize as _quantize  # noqa: E402,F401
