"""Latency measured on a device over ssh (`measured-remote`).

`measure_remote` makes a temporary directory on the device, copies `tools/remote_runner.py` and the
artifact into it, runs the runner with the device's own Python, reads the one JSON line it prints and
removes the directory again. It uses the system `ssh` with BatchMode (never a password prompt) and
StrictHostKeyChecking=yes: an unknown or changed host key is refused, never accepted blindly. The user and
host are checked before ssh runs (`check_destination`), and `--` ends ssh's options before them.

Files travel as `ssh dest 'cat > path'` rather than scp: one quoting rule (the remote POSIX shell's, every
path through `shlex.quote`) whatever scp protocol either side speaks, and it works on devices without an
sftp-server.

On TensorRT the runner runs the trtexec commands built here by `rescompress.export.tensorrt` (the same
builder that writes a deferred export's build command), so the engine timed is the engine the user is told
to build.

Given packed images (`eval_inputs`, see `bench.device_eval`), the same call also runs them through the artifact
on the device and copies their logits back: accuracy measured on the device itself. An engine built on the
device is copied back too (`engine_dir`), with the TensorRT version and GPU trtexec reported.

A failure is a status with a message the user can act on, never an exception:
"ok" | "unreachable" | "host-key" | "auth-failed" | "runtime-missing" | "out-of-memory" | "timeout" | "failed".
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from rescompress.bench.device_eval import EvalOutcome
from rescompress.errors import RescompressError

if TYPE_CHECKING:
    from rescompress.devices import SSHConnection
    from rescompress.export.tensorrt import TensorRTConfig

RUNNER = Path(__file__).resolve().parents[2] / "tools" / "remote_runner.py"
RUNTIMES = ("onnxruntime", "tflite", "tensorrt")
CLEANUP_TIMEOUT_S = 30
TRT_WARMUP_MS = 200  # trtexec warms up for a time, not a number of calls
LATENCY_KEYS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "batch", "warmup", "runs", "threads")
LABEL_KEYS = ("input", "method", "note")
FACT_KEYS = ("python", "numpy", "platform", "machine", "runtime", "runtime_version", "power_mode")
HOST_NAME = re.compile(r"[A-Za-z0-9_.:%-]+")  # a host name, an IPv4 or IPv6 address (with a %scope)
USER_NAME = re.compile(r"[A-Za-z0-9_.@+-]+")

Status = Literal["ok", "unreachable", "host-key", "auth-failed", "runtime-missing", "out-of-memory", "timeout",
                 "failed"]
EVAL_INPUTS, EVAL_LOGITS = "eval_inputs.npy", "eval_logits.npy"  # their names in the device's temporary folder
KILLED = 137  # the shell's status for a process killed by SIGKILL: on a device, most often the OOM killer


class InvalidDestination(RescompressError, ValueError):
    """An ssh user or host that ssh could read as an option, or that does not name one user and one host."""


def check_destination(user: Optional[str], host: str, *, user_from: str = "connection.ssh.user",
                      host_from: str = "connection.ssh.host") -> None:
    """Refuse an ssh destination that is not plainly `user@host`: an empty part, a leading `-` (ssh would
    read it as an option), whitespace, control or shell characters. `user_from`/`host_from` name where
    each part was given, for the message."""
    if not host or host.startswith("-") or not HOST_NAME.fullmatch(host):
        raise InvalidDestination(f"invalid ssh host {host!r} in {host_from}: give a host name or IP address "
                                 "(letters, digits, '.', '-', '_', ':'), not starting with '-'")
    if user is not None and (not user or user.startswith("-") or not USER_NAME.fullmatch(user)):
        raise InvalidDestination(f"invalid ssh user {user!r} in {user_from}: a user name is letters, digits, "
                                 "'.', '_', '-', '@', '+', not empty and not starting with '-'")


def parse_host(host: str) -> tuple[Optional[str], str]:
    """(user or None, host) of a `--host` value, "user@addr" or "addr", each part checked."""
    user, at, addr = host.rpartition("@")
    check_destination(user if at else None, addr, user_from="--host", host_from="--host")
    return (user if at else None), addr


@dataclass
class RemoteOutcome:
    """What a remote measurement gave: a status, a message saying what to do about a failure,
    LatencyStats-style latency when it worked, and the facts the device reported about itself."""
    status: Status
    message: str = ""
    latency: Optional[dict] = None
    device_facts: dict = field(default_factory=dict)
    evaluation: Optional[EvalOutcome] = None  # when packed images were given
    engine: Optional[dict] = None  # an engine built on the device: its local path, TensorRT version and GPU


@dataclass(frozen=True)
class _Extra:
    """What travels besides the artifact: packed images to evaluate, and where a built engine comes back to."""
    eval_inputs: Optional[Path] = None
    engine_dir: Optional[Path] = None


class _Timeout(Exception):
    """The measurement's time budget ran out during an ssh call."""


@dataclass(frozen=True)
class _Target:
    """Where the device is and how ssh reaches it."""
    addr: str
    user: Optional[str]
    port: int
    key: Optional[str]
    known_hosts: str
    global_known_hosts: bool  # False when the profile names its own known_hosts file
    connect_timeout_s: int

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.addr}" if self.user else self.addr

    @property
    def label(self) -> str:
        """user@addr:port, for messages."""
        return f"{self.destination}:{self.port}"

    @property
    def host(self) -> str:
        """user@addr, with :port unless it is 22, for the report."""
        return self.destination if self.port == 22 else self.label


# ----------------------------------------------------------------------------------------- public API

def measure_remote(path: Path, runtime: str, ssh: "SSHConnection", *, engine: Optional["TensorRTConfig"] = None,
                   batch: int = 1, warmup: int = 20, runs: int = 200, threads: Optional[int] = None,
                   chw: Optional[tuple[int, ...]] = None, power_mode_command: Optional[str] = None,
                   trtexec: str = "trtexec", timeout_s: float = 900, host: Optional[str] = None,
                   eval_inputs: Optional[Path] = None, engine_dir: Optional[Path] = None) -> RemoteOutcome:
    """Latency of the artifact at `path` on `runtime`, measured on the device `ssh` reaches (`host`,
    "user@addr" or "addr", overrides its host and user).

    On TensorRT an ONNX is built into an engine on the device with `engine` (default: `engine_config` of
    the file), then timed; a serialized engine is timed as it is, at batch `batch` when its image shape
    `chw` is given. With `eval_inputs` (a .npy of packed images) the images are then run through the
    artifact there and their logits come back in `evaluation`; with `engine_dir`, an engine built on the
    device is copied into it. Connection and device problems come back as a status and message; only
    invalid arguments raise (ValueError; `InvalidDestination` for a user or host that is not one)."""
    _check_args(runtime, batch, warmup, runs, threads)
    path = Path(path)
    target = _target(ssh, host)
    problem = _local_problem(path, target)
    if problem is None and eval_inputs is not None and not Path(eval_inputs).is_file():
        problem = RemoteOutcome("failed", f"the packed images {eval_inputs} do not exist")
    if problem is not None:
        return problem
    args = ["--runtime", runtime, "--batch", str(batch), "--warmup", str(warmup), "--runs", str(runs)]
    if threads is not None:
        args += ["--threads", str(threads)]
    if power_mode_command:
        args += ["--power-mode-command", power_mode_command]
    if runtime == "tensorrt":
        try:
            build, timing = trtexec_commands(path, engine=engine, batch=batch, warmup=warmup, runs=runs,
                                             chw=chw, trtexec=trtexec)
            if eval_inputs is not None:
                args += ["--trtexec-eval", json.dumps(trtexec_eval_spec(path, engine=engine, batch=batch, chw=chw,
                                                                        trtexec=trtexec))]
        except ValueError as exc:
            return RemoteOutcome("failed", str(exc))
        if build is not None:
            args += ["--trtexec-build", json.dumps(build)]
        args += ["--trtexec-time", json.dumps(timing)]
    session = _Session(target, time.monotonic() + timeout_s)
    extra = _Extra(Path(eval_inputs) if eval_inputs is not None else None,
                   Path(engine_dir) if engine_dir is not None else None)
    try:
        return _measure(session, ssh, path, args, extra)
    except _Timeout:
        return RemoteOutcome("timeout", f"the measurement on {target.label} did not finish within {timeout_s:g} s; "
                                        "raise timeout_s, or lower runs")
    except FileNotFoundError as exc:
        if exc.filename != "ssh":
            raise
        return RemoteOutcome("failed", "there is no ssh client on this machine; install it (apt-get install "
                                       "openssh-client)")


def trtexec_commands(path: Path, *, engine: Optional["TensorRTConfig"] = None, batch: int = 1, warmup: int = 20,
                     runs: int = 200, chw: Optional[tuple[int, ...]] = None,
                     trtexec: str = "trtexec") -> tuple[Optional[list[str]], list[str]]:
    """(build argv or None for an engine file, timing argv) that the device runs, in the folder it copies
    `path` to. ValueError when the ONNX cannot be read or the batch lies outside the engine's profile."""
    from rescompress.export.tensorrt import engine_config, onnx_input, trtexec_build_argv, trtexec_time_argv

    path = Path(path)
    warmup_ms = TRT_WARMUP_MS if warmup > 0 else 0
    if path.suffix.lower() != ".onnx":
        return None, trtexec_time_argv(path.name, batch=batch, runs=runs, warmup_ms=warmup_ms, chw=chw,
                                       trtexec=trtexec)
    from rescompress.bench.device_latency import onnx_precision

    input_name, onnx_chw = onnx_input(path)
    engine = engine if engine is not None else engine_config(onnx_precision(path), batch)
    if batch > engine.max_batch:
        raise ValueError(f"batch {batch} is larger than the engine's profile allows (max_batch {engine.max_batch}); "
                         "measure at a smaller batch or raise the tensorrt export's max_batch")
    engine_name = path.with_suffix(".engine").name
    build = trtexec_build_argv(engine, path.name, engine_name, onnx_chw, trtexec, input_name)
    timing = trtexec_time_argv(engine_name, batch=batch, runs=runs, warmup_ms=warmup_ms, chw=onnx_chw,
                               trtexec=trtexec, input_name=input_name)
    return build, timing


def trtexec_eval_spec(path: Path, *, engine: Optional["TensorRTConfig"] = None, batch: int = 1,
                      chw: Optional[tuple[int, ...]] = None, trtexec: str = "trtexec") -> dict:
    """How the device runs packed images through the engine: the trtexec argv per chunk (with `{batch}`,
    `{inputs}` and `{outputs}` for the runner to fill) and the largest chunk the engine's profile takes."""
    from rescompress.export.tensorrt import engine_config, onnx_input, trtexec_eval_argv

    path = Path(path)
    if path.suffix.lower() != ".onnx":  # a serialized engine: its profile is unknown here, so one image at a time
        if chw is None:
            raise ValueError(f"evaluating {path.name} needs its image shape (chw)")
        return {"argv": trtexec_eval_argv(path.name, chw, trtexec), "max_batch": 1}
    from rescompress.bench.device_latency import onnx_precision

    input_name, onnx_chw = onnx_input(path)
    engine = engine if engine is not None else engine_config(onnx_precision(path), batch)
    return {"argv": trtexec_eval_argv(path.with_suffix(".engine").name, onnx_chw, trtexec, input_name),
            "max_batch": engine.max_batch}


# ---------------------------------------------------------------------------------------- arguments

def _check_args(runtime: str, batch: int, warmup: int, runs: int, threads: Optional[int]) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got '{runtime}'")
    if batch < 1 or runs < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise ValueError(f"need batch >= 1, runs >= 1, warmup >= 0, threads >= 1 or None; got batch={batch}, "
                         f"runs={runs}, warmup={warmup}, threads={threads}")


def _target(ssh: "SSHConnection", host: Optional[str]) -> _Target:
    """The ssh target, with `host` ("user@addr" or "addr") overriding the profile's host and user; an
    `InvalidDestination` for a user or host that is not one, before anything runs."""
    if host is not None:  # parse_host checks what --host gives; the profile supplies the rest
        given_user, addr = parse_host(host)
        user = given_user if given_user is not None else ssh.user
    else:
        user, addr = ssh.user, ssh.host
    check_destination(user, addr)  # again right before ssh: a connection may have been built unvalidated
    known = ssh.known_hosts or "~/.ssh/known_hosts"
    return _Target(addr=addr, user=user, port=ssh.port,
                   key=os.path.expanduser(ssh.key) if ssh.key else None,
                   known_hosts=os.path.expanduser(known), global_known_hosts=ssh.known_hosts is None,
                   connect_timeout_s=ssh.connect_timeout_s)


def _local_problem(path: Path, target: _Target) -> Optional[RemoteOutcome]:
    """A problem visible before connecting: missing artifact, runner, key or known_hosts file."""
    if not path.is_file():
        return RemoteOutcome("failed", f"artifact not found: {path}")
    if not RUNNER.is_file():
        return _runner_missing()
    if target.key is not None and not os.path.isfile(target.key):
        return RemoteOutcome("auth-failed", f"the ssh key {target.key} does not exist; set connection.ssh.key to "
                                            f"the private key {target.label} accepts")
    if not target.global_known_hosts and not os.path.isfile(target.known_hosts):
        return RemoteOutcome("host-key", f"the known_hosts file {target.known_hosts} does not exist; verify the "
                                         f"host key of {target.addr}:{target.port} and add it with "
                                         f"{_keyscan(target)} — rescompress never accepts host keys blindly")
    return None


def _runner_missing() -> RemoteOutcome:
    return RemoteOutcome("failed", f"the device runner {RUNNER} is missing; it ships in the rescompress "
                                   "source tree (tools/remote_runner.py)")


# ----------------------------------------------------------------------------------------------- ssh

def _ssh_option_value(value: str) -> str:
    """A path as an `-o` value: ssh splits these at whitespace unless double-quoted."""
    return f'"{value}"' if any(c.isspace() for c in value) else value


def ssh_base_argv(target: _Target) -> list[str]:
    """`ssh` with the options every call uses (no prompts, strict host keys, the profile's key and port),
    then `--` and the destination: nothing after the options is read as one."""
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={_ssh_option_value(target.known_hosts)}",
            "-o", f"ConnectTimeout={target.connect_timeout_s}", "-o", "UpdateHostKeys=no",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    if not target.global_known_hosts:
        argv += ["-o", "GlobalKnownHostsFile=/dev/null"]
    if target.key is not None:
        argv += ["-o", "IdentitiesOnly=yes", "-i", target.key]
    return argv + ["-p", str(target.port), "--", target.destination]


class _Session:
    """ssh calls to one target, sharing one deadline."""

    def __init__(self, target: _Target, deadline: float) -> None:
        self.target = target
        self.deadline = deadline

    def run(self, command: str, stdin_path: Optional[Path] = None,
            timeout_s: Optional[float] = None) -> subprocess.CompletedProcess:
        """Run `command` (a POSIX shell line) on the device; _Timeout past the deadline."""
        timeout = timeout_s if timeout_s is not None else self.deadline - time.monotonic()
        if timeout <= 0:
            raise _Timeout()
        argv = ssh_base_argv(self.target) + [command]
        try:
            if stdin_path is None:
                return subprocess.run(argv, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout,
                                      stdin=subprocess.DEVNULL)
            with open(stdin_path, "rb") as src:
                done = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=src)
            return subprocess.CompletedProcess(argv, done.returncode, done.stdout.decode(errors="replace"),
                                               done.stderr.decode(errors="replace"))
        except subprocess.TimeoutExpired:
            raise _Timeout() from None

    def fetch(self, remote: str, local: Path) -> subprocess.CompletedProcess:
        """Copy the device's file `remote` to `local` (`ssh dest 'cat path'`); _Timeout past the deadline."""
        timeout = self.deadline - time.monotonic()
        if timeout <= 0:
            raise _Timeout()
        argv = ssh_base_argv(self.target) + [f"cat {shlex.quote(remote)}"]
        part = local.with_name(local.name + ".part")
        try:
            with open(part, "wb") as out:
                done = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, timeout=timeout,
                                      stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            part.unlink(missing_ok=True)
            raise _Timeout() from None
        if done.returncode == 0:
            part.replace(local)
        else:
            part.unlink(missing_ok=True)
        return subprocess.CompletedProcess(argv, done.returncode, "", done.stderr.decode(errors="replace"))


def _remote_word(word: str) -> str:
    """`word` quoted for the remote shell, keeping a leading `~/` unquoted so that it still expands."""
    if word == "~":
        return "~"
    if word.startswith("~/"):
        return "~/" + shlex.quote(word[2:]) if word[2:] else "~/"
    return shlex.quote(word)


def _measure(session: _Session, ssh: "SSHConnection", path: Path, runner_args: list[str],
             extra: _Extra = _Extra()) -> RemoteOutcome:
    """mktemp on the device, copy, run, parse, copy results back; the temporary directory is always removed."""
    tmp, failure = _make_tmpdir(session, ssh.workdir)
    if failure is not None:
        return failure
    try:
        outcome = _copy_and_run(session, ssh.python, tmp, path, runner_args, extra)
    finally:
        cleanup_error = _remove_tmpdir(session, tmp)
    if cleanup_error:
        outcome.message = (outcome.message + "; " if outcome.message else "") + cleanup_error
    return outcome


def _make_tmpdir(session: _Session, workdir: str) -> tuple[str, Optional[RemoteOutcome]]:
    """A fresh `rescompress-XXXXXX` directory under `workdir` on the device."""
    base = workdir.rstrip("/") or "/"
    if base.startswith("-"):
        base = "./" + base
    template = _remote_word(base.rstrip("/") + "/rescompress-XXXXXX")
    proc = session.run(f"mktemp -d {template}")
    failure = _ssh_failure(proc, session.target)
    if failure is not None:
        return "", failure
    tmp = proc.stdout.strip()
    if proc.returncode != 0 or not tmp or "\n" in tmp or not tmp.rsplit("/", 1)[-1].startswith("rescompress-"):
        why = _last_line(proc.stderr) or f"mktemp printed '{tmp}'"
        return "", RemoteOutcome("failed", f"could not make a temporary directory under {workdir} on "
                                           f"{session.target.label} ({why}); set connection.ssh.workdir to a "
                                           "writable directory")
    return tmp, None


def _remove_tmpdir(session: _Session, tmp: str) -> str:
    """Remove the temporary directory; an explanation when that failed, else ''."""
    try:
        proc = session.run(f"rm -rf {shlex.quote(tmp)}", timeout_s=CLEANUP_TIMEOUT_S)
    except _Timeout:
        return f"could not remove {tmp} on {session.target.label} (no answer within {CLEANUP_TIMEOUT_S} s)"
    if proc.returncode != 0:
        return f"could not remove {tmp} on {session.target.label}: {_last_line(proc.stderr)}"
    return ""


def _artifact_files(path: Path) -> list[Path]:
    """The artifact, plus an ONNX model's sibling external-data file (`model.onnx.data` or `model.data`)."""
    files = [path]
    if path.suffix.lower() == ".onnx":
        for sibling in (path.with_name(path.name + ".data"), path.with_suffix(".data")):
            if sibling.is_file() and sibling not in files:
                files.append(sibling)
    return files


def _copy_and_run(session: _Session, python: str, tmp: str, path: Path, runner_args: list[str],
                  extra: _Extra = _Extra()) -> RemoteOutcome:
    """Copy the runner, the artifact (and packed images) into `tmp`, run the runner, read its result, and
    copy back the logits and a built engine."""
    uploads = [(src, src.name) for src in [RUNNER, *_artifact_files(path)]]
    if extra.eval_inputs is not None:
        uploads.append((extra.eval_inputs, EVAL_INPUTS))
        runner_args = [*runner_args, "--eval-inputs", f"{tmp}/{EVAL_INPUTS}", "--eval-output", f"{tmp}/{EVAL_LOGITS}"]
    for src, name in uploads:
        dest = f"{tmp}/{name}"
        proc = session.run(f"cat > {shlex.quote(dest)}", stdin_path=src)
        failure = _ssh_failure(proc, session.target)
        if failure is not None:
            return failure
        if proc.returncode != 0:
            return RemoteOutcome("failed", f"could not copy {src.name} to {session.target.label}:{tmp} "
                                           f"({_last_line(proc.stderr)}); is the device's disk full?")
    python_words = [_remote_word(w) for w in shlex.split(python)]
    if not python_words:
        raise ValueError("ssh.python is empty")
    runner = [f"{tmp}/{RUNNER.name}", "--artifact", f"{tmp}/{path.name}", *runner_args]
    proc = session.run(" ".join(python_words + [shlex.quote(a) for a in runner]))
    failure = _ssh_failure(proc, session.target)
    if failure is not None:
        return failure
    outcome = _runner_outcome(proc, session.target, python)
    result = _last_json(proc.stdout) or {}
    if outcome.status == "ok" and extra.eval_inputs is not None:
        outcome.evaluation = _fetch_logits(session, tmp, result.get("eval") or {}, outcome.device_facts)
    if outcome.status == "ok" and extra.engine_dir is not None and result.get("engine"):
        outcome.engine = _fetch_engine(session, tmp, result["engine"], extra.engine_dir)
    return outcome


def _fetch_logits(session: _Session, tmp: str, evaluation: dict, facts: dict) -> EvalOutcome:
    """The device's logits of the packed images, copied back and read; a status when that did not work."""
    import tempfile

    import numpy as np

    where = session.target.label
    if evaluation.get("status") != "ok":
        status = evaluation.get("status") or "failed"
        return EvalOutcome(status if status in ("runtime-missing", "out-of-memory") else "failed",
                           f"on {where}: {evaluation.get('message') or 'the runner reported no evaluation'}")
    with tempfile.TemporaryDirectory(prefix="rescompress-eval-") as work:
        local = Path(work) / EVAL_LOGITS
        proc = session.fetch(f"{tmp}/{EVAL_LOGITS}", local)
        failure = _ssh_failure(proc, session.target)
        if failure is not None:
            return EvalOutcome(failure.status, failure.message)
        if proc.returncode != 0:
            return EvalOutcome("failed", f"could not copy the logits back from {where}: {_last_line(proc.stderr)}")
        try:
            logits = np.load(local, allow_pickle=False)
        except (OSError, ValueError) as exc:
            return EvalOutcome("failed", f"the logits copied back from {where} are not a readable .npy ({exc})")
    return EvalOutcome("ok", logits=np.asarray(logits, dtype=np.float32),
                       method=f"{evaluation.get('method')} on {session.target.host}", device_facts=dict(facts))


def _fetch_engine(session: _Session, tmp: str, engine: dict, engine_dir: Path) -> dict:
    """Copy the engine the device built into `engine_dir`; its record (local path, or why it is not there)."""
    name = engine.get("file")
    record = {k: engine.get(k) for k in ("tensorrt_version", "gpu", "build_command")}
    record["built_on"] = session.target.host
    if not name or "/" in name:
        return {**record, "path": None, "message": f"the device named no engine file ({name!r})"}
    engine_dir.mkdir(parents=True, exist_ok=True)
    local = engine_dir / name
    proc = session.fetch(f"{tmp}/{name}", local)
    if proc.returncode != 0:
        return {**record, "path": None, "message": f"could not copy {name} back: {_last_line(proc.stderr)}"}
    return {**record, "path": str(local)}


# ------------------------------------------------------------------------------------- classification

def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _keyscan(target: _Target) -> str:
    port = f"-p {target.port} " if target.port != 22 else ""
    return f"ssh-keyscan {port}{shlex.quote(target.addr)} >> {shlex.quote(target.known_hosts)}"


def _ssh_failure(proc: subprocess.CompletedProcess, target: _Target) -> Optional[RemoteOutcome]:
    """The connection failure ssh reported (exit status 255), or None when ssh itself worked."""
    if proc.returncode != 255:
        return None
    err = proc.stderr or ""
    low = err.lower()
    if "remote host identification has changed" in low:
        entry = f"[{target.addr}]:{target.port}" if target.port != 22 else target.addr
        return RemoteOutcome("host-key", f"the host key of {target.addr}:{target.port} changed since it was stored in "
                                         f"{target.known_hosts}; if the device was reinstalled, verify the new key, "
                                         f"remove the old one with ssh-keygen -R '{entry}' -f "
                                         f"{shlex.quote(target.known_hosts)} and add the new one with "
                                         f"{_keyscan(target)} — rescompress never accepts host keys blindly")
    if "host key verification failed" in low or "no ed25519 host key is known" in low:
        return RemoteOutcome("host-key", f"the host key of {target.addr}:{target.port} is not in {target.known_hosts} "
                                         f"(or changed); verify it and add it with {_keyscan(target)} — "
                                         "rescompress never accepts host keys blindly")
    if "unprotected private key file" in low or "bad permissions" in low:
        return RemoteOutcome("auth-failed", f"ssh refused to use the key {target.key} because others can read it; "
                                            f"run chmod 600 {target.key}")
    if "permission denied" in low or "too many authentication failures" in low:
        who = target.user or "your user name"
        key = target.key or "any of your default keys"
        return RemoteOutcome("auth-failed", f"ssh to {target.label} was refused: the device did not accept {key} "
                                            f"for {who}; add its public key to ~/.ssh/authorized_keys of {who} on the "
                                            "device, or set connection.ssh.key and user")
    return _unreachable(low, err, target)


def _unreachable(low: str, err: str, target: _Target) -> RemoteOutcome:
    """A network-level failure, or ssh's own last line when it is none of the known ones."""
    if "connection refused" in low:
        return RemoteOutcome("unreachable", f"ssh to {target.label} refused the connection; is sshd running and "
                                            "the port right?")
    if "could not resolve hostname" in low or "name or service not known" in low:
        return RemoteOutcome("unreachable", f"ssh could not resolve the host name '{target.addr}'; check "
                                            "connection.ssh.host (or --host)")
    if "no route to host" in low or "network is unreachable" in low:
        return RemoteOutcome("unreachable", f"ssh found no route to {target.label}; is the device on and on this "
                                            "network?")
    if "timed out" in low:
        return RemoteOutcome("unreachable", f"ssh to {target.label} got no answer within {target.connect_timeout_s} s; "
                                            "is the device on, and are the address and port right?")
    if "connection closed" in low or "connection reset" in low or "broken pipe" in low:
        return RemoteOutcome("unreachable", f"ssh to {target.label} lost the connection ({_last_line(err)}); is the "
                                            "device still up?")
    return RemoteOutcome("failed", f"ssh to {target.label} failed: {_last_line(err) or 'exit status 255'}")


def _runner_outcome(proc: subprocess.CompletedProcess, target: _Target, python: str) -> RemoteOutcome:
    """The runner's JSON line as an outcome, latency source measured-remote."""
    where = target.label
    if proc.returncode == 127:
        return RemoteOutcome("runtime-missing", f"{python} was not found on {where}; install Python 3 there or set "
                                                "connection.ssh.python to its path")
    result = _last_json(proc.stdout)
    if result is None and proc.returncode == KILLED:
        return RemoteOutcome("out-of-memory", f"the runner on {where} was killed (exit status {KILLED}), most often "
                                              "by the device's out-of-memory killer; free memory there or measure "
                                              "a smaller model or batch")
    if result is None:
        why = _last_line(proc.stderr) or f"exit status {proc.returncode}"
        return RemoteOutcome("failed", f"the runner on {where} printed no result ({why})")
    status = result.get("status")
    if status != "ok" or proc.returncode != 0:
        outcome_status = status if status in ("runtime-missing", "out-of-memory") else "failed"
        message = result.get("message") or f"exit status {proc.returncode}"
        return RemoteOutcome(outcome_status, f"on {where}: {message}")
    return RemoteOutcome("ok", "", _latency(result, target.host), {k: result.get(k) for k in FACT_KEYS})


def _last_json(stdout: str) -> Optional[dict]:
    """The JSON object on the runner's last non-empty stdout line."""
    line = _last_line(stdout)
    try:
        value = json.loads(line) if line else None
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _latency(result: dict, host: str) -> dict:
    """LatencyStats-style keys plus where, on what and on which input the numbers were taken."""
    latency = {k: result[k] for k in LATENCY_KEYS}
    latency.update(source="measured-remote", host=host, power_mode=result.get("power_mode"),
                   runtime_version=result.get("runtime_version"))
    latency.update({k: result[k] for k in LABEL_KEYS if result.get(k)})
    return latency
