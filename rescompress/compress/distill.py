"""Knowledge distillation: the student learns from the labels and from a teacher's softened logits,
optionally also matching the teacher's stage outputs (layer1, layer2, ...) through 1x1 adapters.

    loss = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + feature_weight * mean over stages of MSE(adapter(student_stage), teacher_stage)

The teacher is the run's baseline (default: after pruning, that is the unpruned model), the model before
this stage, another registered model trained in the run, or a weights file. It runs beside the student on
`train.device` (the loss functions list it in their `modules`, which `train.fit` moves with the model) and
under the same autocast; it is handed back on the CPU with the student.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rescompress.stages import StageContext, register_stage

if TYPE_CHECKING:
    import torch
    from torch import nn

    from rescompress.train import LossFn


class TeacherModel(BaseModel):
    """A teacher other than the model before the stage: a registry model, trained in the run unless
    `weights` is given."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., description="registry model name (`rescompress list models`)")
    weights: Optional[str] = Field(None, description="state_dict file; without it the teacher is trained here")
    epochs: Optional[int] = Field(None, ge=1, description="training epochs when no weights are given; default train.epochs")
    lr: Optional[float] = Field(None, gt=0.0, description="default: train.lr")


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: Union[Literal["baseline", "previous"], TeacherModel] = Field(
        "baseline", description="'baseline' (the run's baseline model), 'previous' (the model before this stage), "
                                "or {model, weights?, epochs?}")
    epochs: int = Field(5, ge=0)
    lr: Optional[float] = Field(None, gt=0.0, description="default: a tenth of train.lr")
    temperature: float = Field(4.0, gt=0.0)
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="weight of the KL term; 1 - alpha goes to cross-entropy")
    feature_weight: float = Field(0.0, ge=0.0, description="weight of the stage-output (feature) loss; 0 = off")

    @model_validator(mode="after")
    def _weights_exist(self) -> "DistillConfig":
        if isinstance(self.teacher, TeacherModel) and self.teacher.weights and not Path(self.teacher.weights).is_file():
            raise ValueError(f"teacher weights file not found: {self.teacher.weights}")
        return self


def kd_loss(teacher: "nn.Module", *, temperature: float, alpha: float, label_smoothing: float = 0.0) -> "LossFn":
    """A LossFn for `train.fit`: cross-entropy blended with KL divergence to the teacher's logits."""
    import torch
    import torch.nn.functional as F

    teacher.eval()

    def loss_fn(model: "nn.Module", x: "torch.Tensor", y: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        with torch.no_grad():
            t_logits = teacher(x)
        logits = model(x)
        return _blend(logits, t_logits, y, temperature, alpha, label_smoothing), logits

    loss_fn.modules = (teacher,)  # type: ignore[attr-defined]  (fit moves the teacher with the student)
    return loss_fn


def _blend(logits, t_logits, y, temperature: float, alpha: float, label_smoothing: float):
    import torch.nn.functional as F

    ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if alpha == 0.0:
        return ce
    kl = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(t_logits / temperature, 1),
                  reduction="batchmean", log_target=True)
    return (1.0 - alpha) * ce + alpha * temperature**2 * kl


def stage_outputs(model: "nn.Module") -> list[str]:
    """Names of the model's stages (layer1, layer2, ...) whose outputs the feature loss matches."""
    names = getattr(model, "stage_names", None)
    if not names:
        raise ValueError("feature distillation needs a ResNet with stage modules (layer1, layer2, ...)")
    return list(names)


def _build_student(student: "nn.Module", teacher: "nn.Module", example: "torch.Tensor"):
    """A module holding the student and one 1x1 adapter per stage (identity where widths already match),
    so the optimizer trains both and `fit` checkpoints both."""
    import torch
    from torch import nn

    names = stage_outputs(student)
    shapes: dict[str, dict[str, int]] = {"s": {}, "t": {}}
    hooks = []
    for tag, model in (("s", student), ("t", teacher)):
        for name in names:
            hooks.append(getattr(model, name).register_forward_hook(
                lambda _m, _i, out, tag=tag, name=name: shapes[tag].__setitem__(name, out.shape[1])))
    was = student.training
    with torch.no_grad():
        student.eval()(example[:1])
        teacher.eval()(example[:1])
    student.train(was)
    for h in hooks:
        h.remove()

    class Student(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = student
            self.adapters = nn.ModuleDict({
                n: nn.Identity() if shapes["s"][n] == shapes["t"][n] else nn.Conv2d(shapes["s"][n], shapes["t"][n], 1, bias=False)
                for n in names})

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            return self.student(x)

    return Student(), names


@contextlib.contextmanager
def feature_kd_loss(wrapper: "nn.Module", teacher: "nn.Module", names: list[str], *, temperature: float,
                    alpha: float, feature_weight: float, label_smoothing: float = 0.0) -> Iterator["LossFn"]:
    """kd_loss plus MSE between adapted student stage outputs and the teacher's. The forward hooks that
    capture stage outputs live only inside the `with` block."""
    import torch
    import torch.nn.functional as F

    feats: dict[str, dict[str, torch.Tensor]] = {"s": {}, "t": {}}
    hooks = [getattr(model, name).register_forward_hook(
                 lambda _m, _i, out, tag=tag, name=name: feats[tag].__setitem__(name, out))
             for tag, model in (("s", wrapper.student), ("t", teacher)) for name in names]
    teacher.eval()

    def loss_fn(model: "nn.Module", x: "torch.Tensor", y: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        with torch.no_grad():
            t_logits = teacher(x)
        logits = model(x)
        loss = _blend(logits, t_logits, y, temperature, alpha, label_smoothing)
        mse = sum(F.mse_loss(model.adapters[n](feats["s"][n]), feats["t"][n].detach()) for n in names) / len(names)
        return loss + feature_weight * mse, logits

    loss_fn.modules = (teacher,)  # type: ignore[attr-defined]  (fit moves the teacher with the student)
    try:
        yield loss_fn
    finally:
        for h in hooks:
            h.remove()
        feats.clear()


def _teacher(cfg: DistillConfig, ctx: StageContext) -> "nn.Module":
    """The teacher named by the config, trained here when it has no weights (resumable via work_dir)."""
    import torch

    from rescompress.accel import train_device
    from rescompress.models import build_arch, load_weights
    from rescompress.train import evaluate, fit

    if cfg.teacher == "previous":
        if ctx.teacher is None:
            raise ValueError("distill: no previous model to learn from")
        return ctx.teacher
    if cfg.teacher == "baseline":
        if ctx.baseline is None:
            raise ValueError("distill: the run's baseline model is not available")
        return ctx.baseline().eval()
    spec = cfg.teacher
    arch = {**{k: v for k, v in ctx.arch.items() if k != "graph"}, "name": spec.model}
    torch.manual_seed(ctx.seed + 1000 + ctx.index)
    teacher = build_arch(arch)
    if spec.weights:
        load_weights(teacher, spec.weights, model_name=spec.model)
        origin = f"weights {spec.weights}"
    else:
        done = ctx.work_dir / "teacher.pt"
        if done.exists():
            teacher.load_state_dict(torch.load(done, map_location="cpu", weights_only=True))
        else:
            fit(teacher, ctx.data, ctx.recipe.train, epochs=spec.epochs, lr=spec.lr, seed=ctx.seed + 1000 + ctx.index,
                console=ctx.console, state_path=ctx.work_dir / "teacher-state.pt", desc=f"teacher {spec.model}")
            from rescompress.distributed import is_main
            from rescompress.fileio import atomic_write

            if is_main():  # under torchrun only rank 0 writes
                atomic_write(done, lambda p: torch.save(teacher.state_dict(), p))
        origin = f"trained here for {spec.epochs or ctx.recipe.train.epochs} epochs"
    spec_in = ctx.data.input_spec
    acc = evaluate(teacher, ctx.data.test, spec_in, ctx.recipe.train.eval_batch_size,
                   device=train_device(ctx.recipe.train))
    ctx.notes.append(f"teacher {spec.model} ({origin}): test top-1 {acc * 100:.2f}%")
    return teacher.eval()


@register_stage("distill", DistillConfig, "train the model against a teacher's soft labels (KD), optionally matching features")
def distill(model: "nn.Module", cfg: DistillConfig, ctx: StageContext) -> "nn.Module":
    from rescompress.train import fit

    teacher = _teacher(cfg, ctx)
    lr = cfg.lr if cfg.lr is not None else ctx.recipe.train.lr / 10
    smoothing = ctx.recipe.train.label_smoothing
    names: list[str] = []
    with contextlib.ExitStack() as stack:
        if cfg.feature_weight > 0:
            trained, names = _build_student(model, teacher, ctx.example)
            loss = stack.enter_context(feature_kd_loss(trained, teacher, names, temperature=cfg.temperature,
                                                       alpha=cfg.alpha, feature_weight=cfg.feature_weight,
                                                       label_smoothing=smoothing))
        else:
            trained = model
            loss = kd_loss(teacher, temperature=cfg.temperature, alpha=cfg.alpha, label_smoothing=smoothing)
        fit(trained, ctx.data, ctx.recipe.train, epochs=cfg.epochs, lr=lr, seed=ctx.seed + ctx.index + 1,
            console=ctx.console, state_path=ctx.work_dir / "train-state.pt", loss_fn=loss,
            desc=f"distill (stage {ctx.index})")
    ctx.notes.append(f"distilled {cfg.epochs} epochs at T={cfg.temperature}, alpha={cfg.alpha}"
                     + (f", feature loss x{cfg.feature_weight} on {', '.join(names)}" if cfg.feature_weight > 0 else ""))
    return model
