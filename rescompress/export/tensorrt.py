"""TensorRT export: a TensorRT-ready ONNX (fp32 for fp16 engines, int8 QDQ in the tensorrt scheme), linted,
then an engine built where TensorRT and a CUDA GPU exist. Engines are specific to the GPU and TensorRT
version, so without them here the build is deferred: the artifact is the ONNX plus the exact trtexec command
to run on each device. No engine file is ever faked."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from rescompress.errors import BackendMissingError
from rescompress.export import TARGETS, TargetSpec
from rescompress.export.artifact import Artifact
from rescompress.export.lint import Finding, LintResult, lint_file

INSTALL_HINT = "pip install 'rescompress[tensorrt]' on a host with an NVIDIA GPU and CUDA"


class TensorRTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    precision: Literal["fp16", "int8"] = Field(
        "int8", description="int8 builds a strongly typed engine from the tensorrt-scheme QDQ ONNX; fp16 builds "
                            "from the fp32 ONNX with fp16 kernels allowed")
    opset: int = Field(18, ge=18, le=23, description="ONNX opset of the file the engine is built from "
                       "(the int8 QDQ export needs 18 to 23)")
    build: Literal["auto", "defer"] = Field(
        "auto", description="auto: build the engine here when TensorRT and a CUDA GPU are present, else defer; "
                            "defer: always leave the build (trtexec command) to the device")
    workspace_mib: int = Field(1024, gt=0, description="TensorRT builder workspace memory pool, MiB")
    max_batch: int = Field(32, ge=1, description="largest batch of the optimisation profile (min 1, opt 1)")


def tensorrt_available() -> tuple[bool, str]:
    """Whether an engine can be built and run here; when not, why (shown in the deferral message)."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:
        return False, f"TensorRT is not installed here ({type(exc).__name__}: {exc})"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU here (torch.cuda.is_available() is False)"
    return True, ""


def require_tensorrt():
    """The TensorRT module, or a `BackendMissingError` naming the extra that installs it."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:
        raise BackendMissingError(f"TensorRT is not available ({type(exc).__name__}: {exc}): {INSTALL_HINT}") from None
    return tensorrt


def trtexec_build_argv(cfg: TensorRTConfig, onnx_name: str, engine_name: str, chw: tuple[int, ...],
                       trtexec: str = "trtexec", input_name: str = "input") -> list[str]:
    """The trtexec argv that builds the engine from the ONNX (run in the folder holding the ONNX): what a
    deferred export tells the user to run, and what a remote measurement runs on the device."""
    shape = "x".join(str(d) for d in chw)
    return [trtexec, f"--onnx={onnx_name}", f"--saveEngine={engine_name}",
            f"--minShapes={input_name}:1x{shape}", f"--optShapes={input_name}:1x{shape}",
            f"--maxShapes={input_name}:{cfg.max_batch}x{shape}",
            "--stronglyTyped" if cfg.precision == "int8" else "--fp16",
            f"--memPoolSize=workspace:{cfg.workspace_mib}M"]


def trtexec_time_argv(engine_name: str, *, batch: int, runs: int, warmup_ms: int, chw: Optional[tuple[int, ...]] = None,
                      trtexec: str = "trtexec", input_name: str = "input") -> list[str]:
    """The trtexec argv that times a built engine: exactly `runs` iterations at `batch` (when the input's
    `chw` is known; else at the engine's optimisation shape), after `warmup_ms` of warm-up."""
    argv = [trtexec, f"--loadEngine={engine_name}"]
    if chw is not None:
        argv.append(f"--shapes={input_name}:{batch}x" + "x".join(str(d) for d in chw))
    return argv + [f"--warmUp={warmup_ms}", f"--iterations={runs}", "--duration=0"]


def trtexec_eval_argv(engine_name: str, chw: tuple[int, ...], trtexec: str = "trtexec",
                      input_name: str = "input") -> list[str]:
    """The trtexec argv that runs one chunk of images through a built engine: `{batch}` images read from the
    raw binary file `{inputs}` (--loadInputs), the outputs written as JSON to `{outputs}` (--exportOutput);
    the device's runner fills the three fields per chunk."""
    shape = "x".join(str(d) for d in chw)
    return [trtexec, f"--loadEngine={engine_name}", f"--shapes={input_name}:{{batch}}x{shape}",
            f"--loadInputs={input_name}:{{inputs}}", "--exportOutput={outputs}", "--iterations=1", "--warmUp=0",
            "--duration=0"]


def shell_line(argv: list[str]) -> str:
    """`argv` as one POSIX shell line; a `--flag=value` word keeps its flag unquoted (`--onnx='my model.onnx'`)."""
    def word(arg: str) -> str:
        flag, eq, value = arg.partition("=")
        if eq and flag.startswith("--") and shlex.quote(flag) == flag:
            return f"{flag}={shlex.quote(value)}"
        return shlex.quote(arg)

    return " ".join(word(a) for a in argv)


def trtexec_command(cfg: TensorRTConfig, onnx_name: str, engine_name: str, chw: tuple[int, ...],
                    trtexec: str = "trtexec") -> str:
    """The trtexec line that builds the engine from the ONNX, run in the folder holding the ONNX."""
    return shell_line(trtexec_build_argv(cfg, onnx_name, engine_name, chw, trtexec))


def build_commands(cfg: TensorRTConfig, onnx_name: str, engine_name: str, chw: tuple[int, ...],
                   devices=()) -> dict[str, str]:
    """One command per TensorRT device profile (each with its own trtexec path), or a generic one."""
    trt_devices = [d for d in devices if "tensorrt" in d.runtimes]
    if not trt_devices:
        return {"any": trtexec_command(cfg, onnx_name, engine_name, chw)}
    return {d.name: trtexec_command(cfg, onnx_name, engine_name, chw, d.trtexec) for d in trt_devices}


def onnx_input(path: Path) -> tuple[str, tuple[int, ...]]:
    """The name and per-image shape (all but the batch dim) of an ONNX model's one input."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError and friends on a file that is not ONNX
        raise ValueError(f"{Path(path).name} is not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"{Path(path).name} has {len(inputs)} inputs; an image classifier has one")
    dims = inputs[0].type.tensor_type.shape.dim[1:]
    if not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
        raise ValueError(f"{Path(path).name}: input '{inputs[0].name}' has a symbolic dimension besides the batch; "
                         "export the model with a fixed image size")
    return inputs[0].name, tuple(int(d.dim_value) for d in dims)


def engine_config(onnx_precision: str, batch: int = 1) -> TensorRTConfig:
    """How an ONNX file given on its own is built into an engine: strongly typed int8 for a QDQ graph, else
    fp16 (as the tensorrt target builds its fp16 engine from the fp32 ONNX), with a profile up to `batch`."""
    default = TensorRTConfig()
    return TensorRTConfig(precision="int8" if onnx_precision == "int8" else "fp16",
                          max_batch=max(default.max_batch, batch))


def export_tensorrt(model, example, cfg: TensorRTConfig, out_path: Path, *, spec, from_stage: str,
                    devices=(), calibration=None) -> Artifact:
    from rescompress.export.onnx import OnnxConfig, export_onnx

    out_path = Path(out_path)
    onnx_path = out_path.with_suffix(".onnx")
    export_onnx(model, example, OnnxConfig(precision="int8" if cfg.precision == "int8" else "fp32", opset=cfg.opset),
                onnx_path, spec=spec, from_stage=from_stage)
    chw = tuple(int(d) for d in example.shape[1:])
    strongly_typed = cfg.precision == "int8"
    details: dict = {"onnx": onnx_path.name, "strongly_typed": strongly_typed,
                     "build_config": {k: getattr(cfg, k) for k in ("precision", "max_batch", "workspace_mib")}}
    if cfg.precision == "int8":
        from rescompress.compress.qgraph import scheme_of

        details["scheme"] = scheme_of(model)
    lint = lint_file(onnx_path, "tensorrt")
    common = dict(name=f"tensorrt-{cfg.precision}", target="tensorrt", precision=cfg.precision, input_spec=spec,
                  from_stage=from_stage, details=details)
    out_path.unlink(missing_ok=True)  # an engine left by an earlier run would not match this ONNX
    if not lint.passed:
        return _linted(Artifact(path=onnx_path, runtime="tensorrt (not built)", status="failed",
                                message=_lint_failure(lint, details.get("scheme")), **common), lint)

    available, why = tensorrt_available()
    if cfg.build == "defer" or not available:
        reason = "build: defer" if cfg.build == "defer" else why
        commands = build_commands(cfg, onnx_path.name, out_path.name, chw, devices)
        details["build_commands"] = commands
        device, command = next(iter(commands.items()))
        where = "any TensorRT host" if device == "any" else device
        message = (f"engine build deferred: {reason}. Copy {onnx_path.name} to {where} and run: {command}")
        if strongly_typed:
            message += " (TensorRT 8.x, e.g. JetPack 5 and 6.0, has no --stronglyTyped: use --int8 --fp16 there)"
        return _linted(Artifact(path=onnx_path, runtime="tensorrt (engine not built)", status="deferred",
                                message=message, **common), lint)

    version, gpu = _build_engine(onnx_path, out_path, cfg, chw, strongly_typed)
    details.update(tensorrt_version=version, gpu=gpu)
    return _linted(Artifact(path=out_path, runtime=f"tensorrt {version} on {gpu}", load_runner=engine_runner,
                            **common), lint)


def _linted(art: Artifact, lint: LintResult) -> Artifact:
    art.add_lint(lint)
    return art


def _lint_failure(lint: LintResult, scheme: Optional[str]) -> str:
    """The distinct failing rules, each with one node it was found at and its fix."""
    first: dict[str, tuple[int, Finding]] = {}
    for f in lint.errors:
        count, example = first.get(f.rule, (0, f))
        first[f.rule] = (count + 1, example)
    rules = "; ".join(f"{rule} ({count}x, e.g. {f.node or 'graph'}: {f.message}) fix: {f.fix}"
                      for rule, (count, f) in first.items())
    hint = f" The model was quantized with scheme {scheme}; TensorRT needs scheme tensorrt." \
        if scheme and scheme != "tensorrt" else ""
    return f"the ONNX is not TensorRT-ready, no engine built: {rules}.{hint}"


def _build_engine(onnx_path: Path, out_path: Path, cfg: TensorRTConfig, chw: tuple[int, ...],
                  strongly_typed: bool, input_name: str = "input") -> tuple[str, str]:
    """Build with the TensorRT 10 Python API: a strongly typed network for int8 QDQ (the Q/DQ types decide
    the precision), fp16 kernels allowed otherwise. Returns (TensorRT version, GPU name)."""
    import torch

    from rescompress.fileio import atomic_write

    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (1, *chw), (1, *chw), (cfg.max_batch, *chw))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path.name} (its log above says why)")
    atomic_write(out_path, lambda p: p.write_bytes(bytes(serialized)))
    return trt.__version__, torch.cuda.get_device_name(0)


def build_engine(onnx_path: Path, out_path: Path, cfg: TensorRTConfig) -> tuple[str, str]:
    """Build an engine from an ONNX file here, as the export builds it; returns (TensorRT version, GPU name)."""
    input_name, chw = onnx_input(onnx_path)
    return _build_engine(Path(onnx_path), Path(out_path), cfg, chw, cfg.precision == "int8", input_name)


def engine_input(path: Path) -> tuple[str, tuple[int, ...]]:
    """The name and per-image shape (from the optimisation profile's opt shape) of an engine's input."""
    trt = require_tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not load {path}: built for another GPU or TensorRT version?")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    (name,) = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    return name, tuple(int(d) for d in engine.get_tensor_profile_shape(name, 0)[1][1:])


def engine_runner(path: Path, threads: Optional[int]) -> Callable[[np.ndarray], np.ndarray]:
    """A serialized engine as a numpy callable, with torch CUDA tensors as its I/O buffers; batches larger
    than the profile's maximum run in chunks. `threads` does not apply to a GPU engine."""
    import torch

    trt = require_tensorrt()
    if not torch.cuda.is_available():
        raise RuntimeError("running a TensorRT engine needs torch with CUDA (torch.cuda.is_available() is False)")
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not load {path}: built for another GPU or TensorRT version?")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    (input_name,) = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    output_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}
    in_dtype, out_dtype = dtypes[engine.get_tensor_dtype(input_name)], dtypes[engine.get_tensor_dtype(output_name)]
    max_batch = int(engine.get_tensor_profile_shape(input_name, 0)[2][0])
    stream = torch.cuda.Stream()

    def run_chunk(x: np.ndarray) -> np.ndarray:
        inp = torch.from_numpy(x).to("cuda", in_dtype).contiguous()
        context.set_input_shape(input_name, tuple(inp.shape))
        out = torch.empty(tuple(context.get_tensor_shape(output_name)), dtype=out_dtype, device="cuda")
        context.set_tensor_address(input_name, inp.data_ptr())
        context.set_tensor_address(output_name, out.data_ptr())
        stream.wait_stream(torch.cuda.current_stream())
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT inference failed (its log above says why)")
        stream.synchronize()
        return out.float().cpu().numpy()

    def run(x: np.ndarray) -> np.ndarray:
        return np.concatenate([run_chunk(x[i:i + max_batch]) for i in range(0, len(x), max_batch)])

    run.owners = (runtime, engine)  # type: ignore[attr-defined]  # the context must not outlive them
    return run


TARGETS.add("tensorrt", TargetSpec(
    name="tensorrt", config=TensorRTConfig, export=export_tensorrt, precisions=("fp16", "int8"), suffix=".engine",
    runtime="tensorrt", extra="tensorrt", schemes=("tensorrt",),
    reload=lambda details: engine_runner if details.get("tensorrt_version") else None,  # deferred: no engine
    summary="TensorRT engine (fp16, or strongly typed int8 QDQ), built here on a CUDA GPU or deferred to the "
            "device as a linted ONNX plus its trtexec command"))
