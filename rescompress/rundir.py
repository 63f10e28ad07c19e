"""The run directory: a never-reused folder, a manifest of finished steps with content hashes, and
checkpoints that reload with `torch.load(..., weights_only=True)`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from rescompress.errors import ResumeError
from rescompress.fileio import atomic_write, atomic_write_json
from rescompress.recipe import Recipe

MANIFEST = "manifest.json"
CHECKPOINT_FORMAT = "rescompress-checkpoint"


def new_run_dir(out_root: Path, name: str) -> Path:
    """`<out>/<name>-<timestamp>`, never an existing directory."""
    out_root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = out_root / (f"{name}-{stamp}" if n == 1 else f"{name}-{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ResumeError(f"cannot create a new run directory under {out_root}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Manifest:
    path: Path
    data: dict = field(default_factory=dict)

    @classmethod
    def create(cls, run_dir: Path, recipe: Recipe) -> "Manifest":
        m = cls(run_dir / MANIFEST, {"schema_version": 1, "recipe": recipe.name, "recipe_digest": recipe.digest(),
                                     "created": now(), "steps": {}})
        m.save()
        return m

    @classmethod
    def load(cls, run_dir: Path) -> "Manifest":
        path = run_dir / MANIFEST
        if not path.is_file():
            raise ResumeError(f"{run_dir} is not a rescompress run directory (no {MANIFEST})")
        try:
            return cls(path, json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise ResumeError(f"{path} is damaged ({exc}); the run cannot be resumed") from None

    def save(self) -> None:
        from rescompress.distributed import is_main

        if is_main():  # under torchrun the other ranks keep their copy in memory
            atomic_write_json(self.path, self.data)

    def done(self, step: str) -> Optional[dict]:
        entry = self.data["steps"].get(step)
        return entry if entry and entry.get("status") == "done" else None

    def mark(self, step: str, **info: Any) -> None:
        self.data["steps"][step] = {"status": "done", "finished": now(), **info}
        self.save()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def checkpoint_suffix(model: Any) -> str:
    """`.pt` for float models (a state_dict), `.pt2` for int8 models (a torch.export archive)."""
    from rescompress.compress.qgraph import is_quantized

    return ".pt2" if is_quantized(model) else ".pt"


def save_checkpoint(path: Path, model: Any, arch: dict, input_spec: dict, stage: str, metrics: dict) -> str:
    """A checkpoint that reloads without pickled code: a state_dict plus plain data (architecture, input
    spec) for float models, pruned ones included (the tensor shapes are the channel layout); a torch.export
    archive for int8 models."""
    import torch

    meta = {"format": CHECKPOINT_FORMAT, "version": 1, "arch": arch, "input_spec": input_spec, "stage": stage,
            "metrics": metrics}
    if path.suffix == ".pt2":
        from rescompress.compress.pt2e import save_quantized

        example = torch.zeros(2, input_spec["channels"], input_spec["height"], input_spec["width"])
        save_quantized(path, model, example, meta)
    else:
        atomic_write(path, lambda p: torch.save({**meta, "state_dict": model.state_dict()}, p))
    return sha256(path)


def load_checkpoint(path: Path, expected_sha: Optional[str], arch: dict) -> Any:
    """A model from `save_checkpoint`'s file, hash-checked when `expected_sha` is given."""
    import torch

    from rescompress.models import build_arch, conform_to_state_dict

    if not path.is_file():
        raise ResumeError(f"checkpoint {path} is missing; the run cannot continue past it")
    if expected_sha is not None and sha256(path) != expected_sha:
        raise ResumeError(f"checkpoint {path} does not match the hash in {MANIFEST}: it was changed or damaged")
    if path.suffix == ".pt2":
        from rescompress.compress.pt2e import load_quantized

        return load_quantized(path)[0]
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = build_arch(arch)
    conform_to_state_dict(model, payload["state_dict"])  # a pruned model's layer widths come from its tensors
    model.load_state_dict(payload["state_dict"])
    return model.eval()
