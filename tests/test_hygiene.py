"""Nothing a call changes in the process outlives it: thread counts, environment variables, logger levels,
patched library functions. In a local sweep every trial runs in the same process as the ones before it."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn

needs_inc = pytest.mark.skipif(importlib.util.find_spec("neural_compressor") is None,
                               reason="needs the 'inc' extra: pip install 'rescompress[inc]'")
needs_litert = pytest.mark.skipif(importlib.util.find_spec("litert_torch") is None,
                                  reason="needs the 'tflite' extra: pip install 'rescompress[tflite]'")


@pytest.fixture
def logger_level():
    """Set a logger's level for the test and put the original back after it."""
    saved = {}

    def set_level(name: str, level: int) -> logging.Logger:
        logger = logging.getLogger(name)
        saved.setdefault(name, logger.level)
        logger.setLevel(level)
        return logger

    yield set_level
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


class _ThreadProbe(nn.Module):
    """Records torch's thread count each time it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        return x.flatten(1)


def test_torch_runner_runs_at_its_thread_count_and_leaves_the_process_at_its_own():
    from rescompress.data import InputSpec
    from rescompress.export.torch_eager import torch_artifact

    before = torch.get_num_threads()
    wanted = before + 1
    probe = _ThreadProbe()
    art = torch_artifact(probe, InputSpec(channels=1, height=2, width=2, mean=(0.0,), std=(1.0,)), name="torch-fp32", precision="fp32",
                         from_stage="baseline", checkpoint=None)
    try:
        run = art.runner(wanted)
        assert torch.get_num_threads() == before  # loading the runner changes nothing
        out = run(np.zeros((1, 1, 2, 2), np.float32))
        run(np.zeros((1, 1, 2, 2), np.float32))
        assert out.shape == (1, 4)
        assert probe.seen == [wanted, wanted]  # the measurement ran at the thread count it asked for
        assert torch.get_num_threads() == before  # and later training runs at the process's own
    finally:
        torch.set_num_threads(before)


@needs_inc
@pytest.mark.inc
def test_importing_autotune_leaves_the_environment_and_the_tuners_logging_alone():
    env = {k: v for k, v in os.environ.items() if k != "LOGLEVEL"}
    code = ("import logging, os, rescompress.compress.autotune; "
            "print(os.environ.get('LOGLEVEL'), logging.getLogger('neural_compressor').level)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["None", str(logging.INFO)]  # neural-compressor's own default, untouched


@needs_inc
@pytest.mark.inc
def test_autotune_quiets_neural_compressor_only_during_the_call(digits_small, tmp_path, monkeypatch, logger_level):
    import rescompress.compress.quantize as quantize
    import rescompress.train as train
    from rescompress.compress.autotune import autotune
    from rescompress.compress.quantize import PTQConfig
    from rescompress.models import build_model
    from tests.conftest import make_ctx

    logger = logger_level("neural_compressor", logging.DEBUG)
    during: list[int] = []

    def score(model, *args, **kwargs):
        during.append(logger.level)
        return 1.0

    monkeypatch.setattr(train, "evaluate", score)
    monkeypatch.setattr(quantize, "quantize_ptq", lambda model, *args, **kwargs: model)
    model = build_model("resnet_tiny", num_classes=10, in_channels=1, small_input=True)
    ctx = make_ctx(digits_small, tmp_path / "w")
    autotune(model, PTQConfig(autotune={"tolerable_loss": 0.01, "max_trials": 2}), ctx, "onnxruntime")
    assert ctx.record["autotune"]["met"]
    assert during and set(during) == {logging.WARNING}
    assert logger.level == logging.DEBUG


@needs_litert
@pytest.mark.tflite
def test_tflite_export_restores_the_converters_logger(trained_tiny, digits_small, tmp_path, logger_level):
    from rescompress.export.tflite import TFLiteConfig, export_tflite

    logger = logger_level("litert_torch", logging.INFO)
    spec = digits_small.input_spec
    art = export_tflite(trained_tiny, torch.zeros(2, spec.channels, spec.height, spec.width), TFLiteConfig(),
                        tmp_path / "m.tflite", spec=spec, from_stage="test")
    assert art.path.is_file()
    assert logger.level == logging.INFO


@needs_litert
@pytest.mark.tflite
def test_quiet_converter_mutes_litert_torch_inside_and_restores_it_on_error(logger_level):
    from rescompress.export.tflite import quiet_converter

    logger = logger_level("litert_torch", logging.INFO)
    with pytest.raises(RuntimeError, match="conversion failed"):
        with quiet_converter():
            assert logger.level == logging.ERROR
            raise RuntimeError("conversion failed")
    assert logger.level == logging.INFO


def test_convert_leaves_torchaos_folding_helper_as_it_was(trained_tiny):
    from torchao.quantization.pt2e import qat_utils

    from rescompress.compress import pt2e
    from rescompress.compress.schemes import ResNetQuantizer

    original = qat_utils._fold_conv_bn_qat_helper
    example = torch.zeros(2, 1, 8, 8)
    prepared = pt2e.prepare(trained_tiny, example, ResNetQuantizer("tensorrt", qat=True), qat=True)
    converted = pt2e.convert(prepared)
    assert qat_utils._fold_conv_bn_qat_helper is original
    assert pt2e.is_quantized(converted)
    assert not any("batch_norm" in str(n.target) for n in converted.graph.nodes)  # conv2d-bn still folded


def test_concurrent_conversions_leave_torchaos_folding_helper_as_it_was():
    """Two threads converting at once: the second must not save the first's replacement as the original."""
    from torchao.quantization.pt2e import qat_utils

    from rescompress.compress.pt2e import _conv2d_bn_folding_only

    original = qat_utils._fold_conv_bn_qat_helper
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with _conv2d_bn_folding_only():
            first_in.set()
            second_in.wait(timeout=1.0)  # give the second thread the chance to patch over this one
        first_out.set()

    def second() -> None:
        first_in.wait(timeout=10)
        with _conv2d_bn_folding_only():
            second_in.set()
            first_out.wait(timeout=10)  # leave after the first: the order that would leak

    threads = [threading.Thread(target=f) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    try:
        assert not any(t.is_alive() for t in threads)
        assert qat_utils._fold_conv_bn_qat_helper is original
    finally:
        qat_utils._fold_conv_bn_qat_helper = original
