"""Typed errors. Anything derived from `RescompressError` is the user's to fix: the CLI prints its
message without a traceback and exits with code 2."""

from __future__ import annotations


class RescompressError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class RecipeError(RescompressError):
    """The recipe file cannot be read or does not validate."""


class UnknownNameError(RescompressError):
    """A registry lookup (model, dataset, stage, target, device) failed."""


class WeightsError(RescompressError):
    """A weights or checkpoint file is missing, corrupt, or does not fit the architecture."""


class DataError(RescompressError):
    """A dataset is missing or malformed."""


class BackendMissingError(RescompressError):
    """An optional backend is not installed; the message names the extra to install."""


class PlanError(RescompressError):
    """The stage order or run configuration is impossible."""


class ResumeError(RescompressError):
    """A run directory cannot be resumed."""


class ModelImportError(RescompressError):
    """A Keras, ONNX or foreign PyTorch model cannot be imported, or its import does not match the source."""
