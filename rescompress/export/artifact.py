"""An exported model you can call on numpy and save: the one object parity checks and benchmarks use."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from rescompress.data import InputSpec

STATUSES = ("ok", "deferred", "failed", "skipped")


@dataclass
class Artifact:
    """A deployable model file plus what is needed to run and judge it.

    `runner` is built lazily by `load_runner(path, threads)` and maps a float32 NCHW batch (already
    normalised with `input_spec`) to logits.
    """

    name: str
    target: str
    precision: str
    path: Optional[Path]
    input_spec: InputSpec
    runtime: str  # the runtime that executes it, with its version
    status: str = "ok"
    message: str = ""
    from_stage: str = ""
    reference: str = ""  # the artifact it is compared with (the torch model it was exported from)
    accuracy_only: str = ""  # why its latency means nothing (a reference, not a deployment path); "" = timed
    load_runner: Optional[Callable[[Path, Optional[int]], Callable[[np.ndarray], np.ndarray]]] = None
    lint: list[dict] = field(default_factory=list)  # findings of every lint run on it, each with its "target"
    lint_checked: dict = field(default_factory=dict)  # lint target -> {passed, errors, warnings, checked}
    details: dict = field(default_factory=dict)  # target-specific facts (engine build command, converter, ...)
    _runner: Any = field(default=None, repr=False)
    _threads: Optional[int] = field(default=None, repr=False)

    def runner(self, threads: Optional[int] = None) -> Callable[[np.ndarray], np.ndarray]:
        if self.status != "ok" or self.load_runner is None:
            raise RuntimeError(f"artifact {self.name} cannot run: {self.status} {self.message}".strip())
        if self._runner is None or threads != self._threads:
            self._runner = self.load_runner(self.path, threads)
            self._threads = threads
        return self._runner

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.runner(self._threads)(np.ascontiguousarray(x, dtype=np.float32))

    def add_lint(self, result) -> None:
        """Record a `LintResult` (rescompress.export.lint) on this artifact."""
        self.lint.extend({**f.to_dict(), "target": result.target} for f in result.findings)
        summary = result.to_dict()
        self.lint_checked[result.target] = {**{k: summary[k] for k in ("passed", "errors", "warnings", "checked")},
                                            "status": "passed" if summary["passed"] else "failed"}

    def add_lint_crash(self, target: str, exc: Exception) -> None:
        """Record that the `target` lint itself failed on this file: an error finding (rule `lint-crashed`)
        and `lint_checked[target].status == "crashed"`, so the report shows a failure, not a missing lint."""
        why = f"{type(exc).__name__}: {exc}".strip()
        self.lint.append({"target": target, "rule": "lint-crashed", "severity": "error", "node": "",
                          "message": f"the {target} lint could not check this file: {why}",
                          "fix": "the file may be corrupt or use an operator the lint cannot read; run "
                                 f"`rescompress lint FILE --target {target}` to see the traceback"})
        self.lint_checked[target] = {"passed": False, "status": "crashed", "errors": 1, "warnings": 0,
                                     "checked": f"nothing: the lint crashed ({why[:200]})"}

    def release(self) -> None:
        """Drop the runtime session (benchmark one session at a time)."""
        self._runner = None

    @property
    def size_bytes(self) -> Optional[int]:
        return self.path.stat().st_size if self.path is not None and self.path.exists() else None

    def save(self, dest: str | Path) -> Path:
        if self.path is None:
            raise RuntimeError(f"artifact {self.name} has no file")
        dest = Path(dest)
        shutil.copyfile(self.path, dest)
        return dest

    @classmethod
    def from_record(cls, record: dict, path: Optional[Path], load_runner: Optional[Callable] = None) -> "Artifact":
        """The artifact a `record` (`to_report()` plus `reference`) describes, its file at `path`."""
        return cls(name=record["name"], target=record["target"], precision=record["precision"], path=path,
                   input_spec=InputSpec.from_dict(record["input_spec"]), runtime=record.get("runtime") or "",
                   status=record["status"], message=record.get("message") or "",
                   from_stage=record.get("from_stage") or "", reference=record.get("reference") or "",
                   accuracy_only=record.get("accuracy_only") or "", load_runner=load_runner,
                   lint=list(record.get("lint") or []), lint_checked=dict(record.get("lint_checked") or {}),
                   details=dict(record.get("details") or {}))

    def to_report(self) -> dict:
        return {
            "name": self.name,
            "target": self.target,
            "precision": self.precision,
            "from_stage": self.from_stage,
            "path": str(self.path) if self.path is not None else None,
            "status": self.status,
            "message": self.message,
            "size_bytes": self.size_bytes,
            "runtime": self.runtime,
            "input_spec": self.input_spec.to_dict(),
            "lint": self.lint,
            "lint_checked": self.lint_checked,
            "details": self.details,
            "accuracy_only": self.accuracy_only or None,
        }


def parity(artifact: Callable[[np.ndarray], np.ndarray], reference: Callable[[np.ndarray], np.ndarray],
           inputs: np.ndarray, batch_size: int = 64) -> dict:
    """Max |logit difference| and top-1 agreement of `artifact` against `reference` on the same inputs."""
    if not len(inputs):
        return {"max_abs_diff": 0.0, "top1_agreement": 0.0}
    steps = range(0, len(inputs), batch_size)
    logits = [np.concatenate([f(inputs[i:i + batch_size]) for i in steps]) for f in (artifact, reference)]
    return parity_of_logits(*logits)


def parity_of_logits(logits: np.ndarray, reference: np.ndarray) -> dict:
    """Max |logit difference| and top-1 agreement of two sets of logits for the same inputs."""
    if logits.shape != reference.shape:
        raise ValueError(f"logits of shape {logits.shape} cannot be compared with {reference.shape}")
    if not len(logits):
        return {"max_abs_diff": 0.0, "top1_agreement": 0.0}
    return {"max_abs_diff": float(np.abs(logits - reference).max()),
            "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).mean())}


def top1(artifact: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> float:
    correct = 0
    for i in range(0, len(inputs), batch_size):
        correct += int((artifact(inputs[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
    return correct / max(1, len(inputs))
