"""Device profiles: one YAML file per device under `devices/` (or a path given in the recipe).

A profile says what the device runs (runtimes and their precisions, on which compute unit), what its
hardware can do (peak operations per second per precision, memory bandwidth, the CPU's int8 instructions),
what has been published about it (reference latencies with their sources, which calibrate the latency
estimate or check it), how to reach it (ssh, adb) and how it reports its power mode.

Profiles are looked up by name in the working directory's `devices/`, then in the built-in ones shipped with
rescompress. A profile carries commands that are run (its trtexec path, the device's python, the power-mode
command), so a local profile that shadows a built-in one is warned about (`ProfileShadowWarning`), and every
loaded profile remembers its file and that file's sha256 (`DeviceProfile.origin`), which the report records.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from rescompress.errors import RecipeError, UnknownNameError
from rescompress.registry import suggest

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "devices"
CPUINFO = Path("/proc/cpuinfo")  # where the `cpu: {isa: host}` profile's features are read

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComputeUnit(Strict):
    """One processor the device's runtimes run on (a GPU, the CPU cluster, an NPU)."""
    description: str = ""
    peak_tops: dict[Precision, float] = Field(
        ..., description="dense peak, in tera-operations per second (1 multiply-accumulate = 2 operations), "
                         "per precision; sparse figures are halved")
    memory_gbps: float = Field(..., gt=0, description="memory bandwidth, GB/s")
    source: str = Field("", description="where the peak figures come from")

    @field_validator("peak_tops")
    @classmethod
    def _positive(cls, value: dict) -> dict:
        if not value:
            raise ValueError("give at least one precision's peak, e.g. {fp32: 5.3}")
        for precision, tops in value.items():
            if not tops > 0:
                raise ValueError(f"peak_tops.{precision} must be > 0, got {tops}")
        return value


# int8 dot-product instructions, by their /proc/cpuinfo flag names: Arm's SDOT/UDOT (ARMv8.2 dotprod) and
# USDOT/SMMLA (ARMv8.6 i8mm); x86's VNNI (AVX512-VNNI, AVX-VNNI) and AMX-INT8
INT8_DOT_FEATURES: dict[str, tuple[str, ...]] = {"arm64": ("asimddp", "i8mm"),
                                                 "x86_64": ("avx512_vnni", "avx_vnni", "amx_int8")}
_MACHINES = {"aarch64": "arm64", "arm64": "arm64", "x86_64": "x86_64", "amd64": "x86_64"}


class CPU(Strict):
    """The device's application CPU, as far as int8 kernels care (onnxruntime's CPU kernels pick their int8
    path by architecture and dot-product instructions)."""
    model: str = Field("", description="e.g. 6x Arm Cortex-A78AE (ARMv8.2-A)")
    arch: Optional[Literal["arm64", "x86_64"]] = Field(None, description="instruction-set architecture")
    isa: Union[Literal["host"], list[str], None] = Field(
        None, description="instruction-set features by their /proc/cpuinfo flag names (asimddp, i8mm; avx2, "
                          "avx512_vnni, avx_vnni); a list names every int8 dot-product feature the CPU has, so "
                          "one without any lists none of them. `host`: this host's CPU, whose architecture and "
                          "features are read from this machine when needed. Omitted: unknown")

    @model_validator(mode="after")
    def _host_or_listed(self) -> "CPU":
        if self.isa == "host" and self.arch is not None:
            raise ValueError("cpu.arch is read from this host when cpu.isa is 'host'; drop cpu.arch")
        if isinstance(self.isa, list) and self.arch is None:
            raise ValueError("cpu.isa lists features of an architecture: give cpu.arch (arm64 or x86_64)")
        return self

    def features(self) -> "CPUFeatures":
        """The architecture and features to judge int8 kernels by; for `isa: host`, read from this machine."""
        if self.isa == "host":
            return host_cpu()
        if self.isa is None:
            return CPUFeatures(self.arch, None, "unknown: the profile's cpu section lists no isa features"
                               + ("" if self.arch else " and no arch"))
        return CPUFeatures(self.arch, frozenset(self.isa), "the profile")


@dataclass(frozen=True)
class CPUFeatures:
    arch: Optional[str]  # arm64 | x86_64 | None (unknown)
    isa: Optional[frozenset[str]]  # None: unknown
    where: str  # where they were read ("the profile", "this host's /proc/cpuinfo"), or "unknown: <why>"

    @property
    def int8_dot(self) -> Optional[bool]:
        """Whether the CPU has an int8 dot-product instruction; None when that is not known."""
        if self.arch not in INT8_DOT_FEATURES or self.isa is None:
            return None
        return any(f in self.isa for f in INT8_DOT_FEATURES[self.arch])


def host_cpu(cpuinfo: Optional[Path] = None) -> CPUFeatures:
    """This machine's architecture and CPU flags (Linux /proc/cpuinfo); unknown features when it cannot be read."""
    cpuinfo = CPUINFO if cpuinfo is None else cpuinfo
    arch = _MACHINES.get(platform.machine().lower())
    if arch is None:
        return CPUFeatures(None, None, f"unknown: this host's architecture {platform.machine()!r} is neither "
                                       f"arm64 nor x86_64")
    try:
        text = cpuinfo.read_text(errors="ignore")
    except OSError as exc:
        return CPUFeatures(arch, None, f"unknown: {cpuinfo} cannot be read ({exc.strerror or exc})")
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 and Arm spell the line differently
            flags.update(value.split())
    if not flags:
        return CPUFeatures(arch, None, f"unknown: {cpuinfo} lists no CPU flags")
    return CPUFeatures(arch, frozenset(flags), f"this host's {cpuinfo}")


class RuntimeSupport(Strict):
    """A runtime on the device: the precisions it runs and the compute unit it runs them on."""
    precisions: list[Precision] = list(PRECISIONS)
    unit: Optional[str] = Field(None, description="a key of `compute`; without one, latency cannot be estimated")
    estimate_group: Optional[str] = Field(
        None, description="profiles whose runtimes share a group pool their published figures to calibrate "
                          "one estimate (same kind of hardware and software, e.g. orin-gpu-tensorrt)")


class PublishedLatency(Strict):
    """A latency someone published for a reference model on this device."""
    model: str = Field(..., description="a registry model name, e.g. resnet50")
    input_size: int = Field(224, gt=0)
    num_classes: int = Field(1000, gt=0)
    batch: int = Field(1, gt=0)
    runtime: str
    precision: Precision
    latency_ms: float = Field(..., gt=0)
    statistic: Literal["p50", "p90", "mean"] = Field(
        "mean", description="what the figure is: MLPerf SingleStream reports the 90th percentile")
    use: Literal["calibrate", "holdout"] = Field(
        "calibrate", description="calibrate: fits the estimate, and is checked against the fit on the group's "
                                 "other figures (leave-one-out); holdout: never fitted, only checks the estimate")
    source: str = Field(..., min_length=3, description="who published it, where, and when")
    url: Optional[str] = None
    note: str = ""


class SSHConnection(Strict):
    host: str
    user: Optional[str] = None
    port: int = Field(22, gt=0, lt=65536)
    key: Optional[str] = Field(None, description="private key file; default: ssh's own choice")
    known_hosts: Optional[str] = Field(
        None, description="known_hosts file holding the device's host key (default ~/.ssh/known_hosts); "
                          "an unknown or changed host key is refused, never accepted blindly")
    python: str = Field("python3", description="the device's Python, which runs tools/remote_runner.py")
    workdir: str = Field("/tmp", description="where a temporary directory for the artifact is made")
    connect_timeout_s: int = Field(10, gt=0)

    @model_validator(mode="after")
    def _plain_destination(self) -> "SSHConnection":
        from rescompress.bench.remote import check_destination

        check_destination(self.user, self.host)  # a ValueError: refused when the profile loads, before any ssh
        return self

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


ADB_SERIAL = re.compile(r"[A-Za-z0-9_.:-]+")  # USB serials, host:port of adb over Wi-Fi, mDNS service names
DEVICE_PATH = re.compile(r"/[A-Za-z0-9_./+-]*")  # an absolute path on the phone, in plain characters
ADB_DELEGATES = ("xnnpack", "gpu", "nnapi")
ADB_RUNTIMES = ("tflite",)  # what benchmark_model runs


class ADBConnection(Strict):
    """An Android phone reached with the host's `adb`, where TFLite's `benchmark_model` runs the artifact
    (see `rescompress.bench.adb`)."""
    serial: str = Field(..., description="the phone's serial, as `adb devices` lists it (host:port over Wi-Fi)")
    workdir: str = Field("/data/local/tmp", description="where a temporary directory for the artifact is made")
    adb: str = Field("adb", description="the host's adb executable")
    benchmark_model: str = Field("/data/local/tmp/benchmark_model",
                                 description="TFLite's benchmark_model binary on the phone (pushed there once, "
                                             "chmod +x)")
    delegates: list[Literal["xnnpack", "gpu", "nnapi"]] = Field(
        default_factory=lambda: ["xnnpack"], min_length=1,
        description="benchmark_model delegates to measure with; the first is the primary one")
    timeout_s: float = Field(900, gt=0, description="time budget of one measurement or evaluation, adb calls included")

    @field_validator("serial")
    @classmethod
    def _plain_serial(cls, value: str) -> str:
        if not value or value.startswith("-") or not ADB_SERIAL.fullmatch(value):
            raise ValueError(f"invalid adb serial {value!r}: give it as `adb devices` lists it (letters, digits, "
                             "'.', '_', ':', '-'), not starting with '-'")
        return value

    @field_validator("workdir", "benchmark_model")
    @classmethod
    def _plain_path(cls, value: str) -> str:
        if not DEVICE_PATH.fullmatch(value) or "/../" in value + "/" or value.rstrip("/") == "":
            raise ValueError(f"invalid path on the phone {value!r}: give an absolute path of letters, digits and "
                             "'_', '.', '/', '+', '-' (no spaces, no '..'), e.g. /data/local/tmp")
        return value

    @field_validator("adb")
    @classmethod
    def _some_adb(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("adb is empty: give the host's adb executable (`adb`, or its path)")
        return value

    @field_validator("delegates")
    @classmethod
    def _distinct(cls, value: list) -> list:
        if len(set(value)) != len(value):
            raise ValueError(f"delegates lists one more than once: {value}")
        return value

    @property
    def delegate(self) -> str:
        """The primary delegate."""
        return self.delegates[0]


class Connection(Strict):
    ssh: Optional[SSHConnection] = None
    adb: Optional[ADBConnection] = None


class DeviceProfile(Strict):
    name: str
    description: str = ""
    latency_source: Literal["auto", "measured", "measured-remote", "estimated", "none"] = Field(
        "auto", description="measured: on this host, in the artifact's runtime; measured-remote: on the device "
                            "over its connection; estimated: roofline calibrated on published figures; none: "
                            "accuracy only; auto: measured-remote with a connection, else estimated where the "
                            "runtime can be estimated, else none")
    runtimes: dict[str, RuntimeSupport] = Field(default_factory=lambda: {"torch": RuntimeSupport(),
                                                                         "onnxruntime": RuntimeSupport()})
    compute: dict[str, ComputeUnit] = {}
    published: list[PublishedLatency] = []
    connection: Optional[Connection] = None
    power_mode_command: Optional[str] = Field(None, description="prints the power mode, e.g. `nvpmodel -q`")
    int8_scheme: Optional[Literal["tensorrt", "onnxruntime", "tflite"]] = Field(
        None, description="the int8 layout its runtime runs fast; the default scheme of qat/ptq stages")
    threads: Optional[int] = Field(None, gt=0, description="default: the recipe's report.latency.threads")
    trtexec: str = Field("trtexec", description="trtexec on the device, for the engine build command of a deferred "
                                                "tensorrt export and for remote runs (JetPack: /usr/src/tensorrt/bin/trtexec)")
    cpu: Optional[CPU] = Field(None, description="the application CPU (onnxruntime runs on it); without one its "
                                                 "int8 instructions are unknown")
    _origin: Optional["ProfileOrigin"] = PrivateAttr(None)

    @field_validator("runtimes", mode="before")
    @classmethod
    def _runtime_list(cls, value: object) -> object:
        """`runtimes: [tensorrt, onnxruntime]` is short for each runtime with every precision, no unit."""
        if isinstance(value, list):
            return {name: {} for name in value}
        return {k: ({} if v is None else v) for k, v in value.items()} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _references(self) -> "DeviceProfile":
        for name, rt in self.runtimes.items():
            if rt.unit is not None and rt.unit not in self.compute:
                raise ValueError(f"runtimes.{name}.unit '{rt.unit}' is not a key of compute "
                                 f"({', '.join(self.compute) or 'none defined'})")
            if rt.unit is not None:
                missing = [p for p in rt.precisions if p not in self.compute[rt.unit].peak_tops]
                if missing:
                    raise ValueError(f"runtimes.{name} runs {', '.join(missing)} on unit '{rt.unit}', "
                                     f"whose peak_tops has no figure for it")
        for i, fig in enumerate(self.published):
            if fig.runtime not in self.runtimes:
                raise ValueError(f"published[{i}].runtime '{fig.runtime}' is not one of runtimes "
                                 f"({', '.join(self.runtimes)})")
        if self.latency_source == "measured-remote":
            if self.ssh is None and self.adb is None:
                raise ValueError("latency_source measured-remote needs connection.ssh, or connection.adb for tflite")
            others = [rt for rt in self.runtimes if rt not in (*ADB_RUNTIMES, "torch")]  # torch: the host's reference
            if self.ssh is None and others:
                raise ValueError(f"latency_source measured-remote over connection.adb measures tflite only, and "
                                 f"runtimes lists {', '.join(others)}; use latency_source auto (the others are "
                                 "estimated) or add connection.ssh")
        return self

    @property
    def origin(self) -> Optional["ProfileOrigin"]:
        """The file this profile was loaded from; None for a profile built in code."""
        return self._origin

    def provenance(self) -> dict:
        """For a report: `profile`, the file this profile was read from, its sha256 and whether it is built in."""
        return {"profile": asdict(self._origin)} if self._origin is not None else {}

    def cpu_features(self) -> CPUFeatures:
        """The CPU's architecture and int8-relevant features, or unknowns saying why."""
        if self.cpu is None:
            return CPUFeatures(None, None, f"unknown: profile {self.name} has no `cpu` section")
        return self.cpu.features()

    @property
    def ssh(self) -> Optional[SSHConnection]:
        return self.connection.ssh if self.connection else None

    @property
    def adb(self) -> Optional[ADBConnection]:
        return self.connection.adb if self.connection else None

    def precisions(self, runtime: str) -> list[str]:
        return list(self.runtimes[runtime].precisions) if runtime in self.runtimes else []

    def latency_plan(self, runtime: str) -> str:
        """How latency of an artifact running on `runtime` is obtained on this device. With `auto`, a
        connection.ssh measures every runtime on the device; a connection.adb measures tflite (benchmark_model),
        and the other runtimes are estimated as without a connection."""
        if self.latency_source != "auto":
            return self.latency_source
        if self.ssh is not None or (self.adb is not None and runtime in ADB_RUNTIMES):
            return "measured-remote"
        rt = self.runtimes.get(runtime)
        return "estimated" if rt is not None and rt.unit is not None and rt.estimate_group else "none"


@dataclass(frozen=True)
class ProfileOrigin:
    """Where a profile came from: the commands it carries are run, so the report says which file it was."""
    path: str
    sha256: str
    builtin: bool  # one of the profiles shipped with rescompress


class ProfileShadowWarning(UserWarning):
    """A profile in the working directory's devices/ is used instead of the built-in one of the same name."""


def search_dirs() -> list[Path]:
    dirs = [Path.cwd() / "devices", BUILTIN_DIR]
    return list(dict.fromkeys(d.resolve() for d in dirs if d.is_dir()))


def available_devices() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in reversed(search_dirs()):  # the working directory's profiles win
        for f in sorted(d.glob("*.yaml")):
            found[f.stem] = f
    return dict(sorted(found.items()))


def builtin_devices() -> dict[str, Path]:
    """The profiles shipped with rescompress, by name."""
    return {f.stem: f for f in sorted(BUILTIN_DIR.glob("*.yaml"))} if BUILTIN_DIR.is_dir() else {}


def is_builtin(path: Path) -> bool:
    return path.resolve().parent == BUILTIN_DIR.resolve()


def load_device(name_or_path: str) -> DeviceProfile:
    """A device by profile name (`host-cpu`) or by path to a YAML profile. A name found in the working
    directory's devices/ that is also a built-in profile's name loads the local file, with a
    `ProfileShadowWarning`."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        known = available_devices()
        if name_or_path not in known:
            raise UnknownNameError(
                f"unknown device '{name_or_path}'{suggest(name_or_path, list(known))} (known: {', '.join(known)})")
        path = known[name_or_path]
        builtin = builtin_devices().get(name_or_path)
        if builtin is not None and not is_builtin(path):
            warnings.warn(f"device '{name_or_path}': using {path}, which shadows the built-in profile {builtin} "
                          f"(its commands, trtexec and python paths are the local file's); give the path in the "
                          f"recipe to make that explicit, or rename the file", ProfileShadowWarning, stacklevel=2)
    if not path.is_file():
        raise RecipeError(f"device profile not found: {path}")
    try:
        raw = path.read_bytes()
        data = yaml.safe_load(raw.decode("utf-8"))
        device = DeviceProfile.model_validate(data)
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: YAML syntax error: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise RecipeError(f"{path}: {loc}: {first['msg']}") from None
    device._origin = ProfileOrigin(str(path.resolve()), hashlib.sha256(raw).hexdigest(), is_builtin(path))
    return device


def group_figures(group: str, devices: Optional[list[DeviceProfile]] = None) -> list[tuple[DeviceProfile, PublishedLatency]]:
    """Every published figure, from the built-in profiles (or `devices`), for a runtime in estimate group
    `group`; the same figure on the same hardware counts once."""
    if devices is None:
        devices = estimate_pool([])
    out, seen = [], set()
    for dev in devices:
        for fig in dev.published:
            rt = dev.runtimes.get(fig.runtime)
            if rt is None or rt.estimate_group != group:
                continue
            unit = dev.compute.get(rt.unit) if rt.unit else None
            same = json.dumps([fig.model_dump(mode="json"), unit.model_dump(mode="json") if unit else None],
                              sort_keys=True)
            if same not in seen:  # a copy of a profile (another name, same hardware) adds no evidence
                seen.add(same)
                out.append((dev, fig))
    return out


def estimate_pool(devices: list[DeviceProfile]) -> list[DeviceProfile]:
    """The built-in profiles plus `devices` (a recipe's, which may be files of their own; they win by name): the
    profiles whose published figures calibrate latency estimates. Other files in the working directory's
    devices/ are not read, so an estimate depends on the recipe and rescompress, not on where it runs."""
    pool = {name: load_device(str(path)) for name, path in builtin_devices().items()}
    pool.update({d.name: d for d in devices})
    return list(pool.values())
