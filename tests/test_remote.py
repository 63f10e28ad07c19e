"""measured-remote: tools/remote_runner.py and bench.remote against a real sshd on 127.0.0.1.

The "device" is this machine: a throwaway sshd with its own host key and one authorized client key, and
this venv's Python (numpy + onnxruntime) as the device's Python.
"""

from __future__ import annotations

import getpass
import importlib.util
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rescompress.bench.remote import (RUNNER, InvalidDestination, RemoteOutcome, _remote_word, _ssh_failure, _Target,
                                      check_destination, measure_remote, ssh_base_argv)
from tests.remote_device import free_port, keygen, known_hosts_line, onnx_model, python_without, sshd  # noqa: F401

FAST = {"warmup": 2, "runs": 20}


def load_runner():
    """tools/remote_runner.py as a module (it is a standalone script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("remote_runner", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The device's workdir: a path with a space, quotes and a `$`, to prove every remote path is quoted."""
    d = tmp_path / "dev ice's \"$dir\""
    d.mkdir()
    return d


# ------------------------------------------------------------------------------------------ over ssh

def test_end_to_end_measures_on_the_device_and_cleans_up(sshd, onnx_model, workdir):
    import onnxruntime

    out = measure_remote(onnx_model, "onnxruntime", sshd.connection(workdir), batch=2, threads=1,
                         power_mode_command="/bin/echo MODE_15W", **FAST)
    assert out.status == "ok", out.message
    lat = out.latency
    assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
    assert lat["mean_ms"] > 0
    assert (lat["batch"], lat["warmup"], lat["runs"], lat["threads"]) == (2, 2, 20, 1)
    assert lat["source"] == "measured-remote" and lat["power_mode"] == "MODE_15W"
    assert lat["input"] == "random: seeded standard normal (seed 0)" and "remote_runner.py" in lat["method"]
    assert lat["runtime_version"] == onnxruntime.__version__
    assert lat["host"] == f"{getpass.getuser()}@127.0.0.1:{sshd.port}"
    assert out.device_facts["python"] == platform.python_version()
    assert out.device_facts["runtime"] == "onnxruntime" and out.device_facts["power_mode"] == "MODE_15W"
    assert list(workdir.iterdir()) == [], "the remote temporary directory was not removed"


def test_host_override_replaces_host_and_user(sshd, onnx_model, workdir):
    conn = sshd.connection(workdir, host="no-such-host.invalid", user="nobody")
    out = measure_remote(onnx_model, "onnxruntime", conn, host=f"{getpass.getuser()}@127.0.0.1", **FAST)
    assert out.status == "ok", out.message


BAD_DESTINATIONS = [
    ("-oProxyCommand=touch {marker}", "127.0.0.1", "user"),  # ssh would read the user as an option
    ("me", "-oProxyCommand=touch {marker}", "host"),
    ("me x", "127.0.0.1", "user"),
    ("me", "127.0.0.1 -oProxyCommand=touch", "host"),
    ("me\n", "127.0.0.1", "user"),
    ("me", "127.0.0.1\x00", "host"),
    ("", "127.0.0.1", "user"),
    ("me", "", "host"),
    ("me;touch {marker}", "127.0.0.1", "user"),
]


@pytest.mark.parametrize("user, host, part", BAD_DESTINATIONS)
def test_a_user_or_host_that_is_not_one_is_refused(user, host, part, tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(InvalidDestination, match=f"invalid ssh {part} "):
        check_destination(user.format(marker=marker), host.format(marker=marker))
    check_destination("jetson_1.me+x@corp", "fe80::1%eth0")
    check_destination(None, "orin-nano.local")


def test_an_option_in_the_host_override_is_refused_before_ssh_runs(sshd, onnx_model, workdir, tmp_path):
    """`--host '-oProxyCommand=touch FILE@addr'`: the user part would be an ssh option running a command."""
    marker = tmp_path / "pwned"
    with pytest.raises(InvalidDestination, match=r"invalid ssh user '-oProxyCommand=touch .*' in --host"):
        measure_remote(onnx_model, "onnxruntime", sshd.connection(workdir), host=f"-oProxyCommand=touch {marker}@h",
                       **FAST)
    with pytest.raises(InvalidDestination, match="invalid ssh user '' in --host"):
        measure_remote(onnx_model, "onnxruntime", sshd.connection(workdir), host="@127.0.0.1", **FAST)
    assert not list(tmp_path.glob("pwned*")), "the ProxyCommand ran"
    assert list(workdir.iterdir()) == []


def test_an_option_in_the_profile_user_is_refused_before_ssh_runs(sshd, onnx_model, workdir, tmp_path):
    marker = tmp_path / "pwned"
    # model_copy skips the profile's own checks: this is the check where the destination is built
    conn = sshd.connection(workdir).model_copy(update={"user": f"-oProxyCommand=touch {marker}"})
    with pytest.raises(InvalidDestination, match="invalid ssh user '-oProxyCommand=.*' in connection.ssh.user"):
        measure_remote(onnx_model, "onnxruntime", conn, **FAST)
    conn = sshd.connection(workdir).model_copy(update={"host": f"-oProxyCommand=touch {marker}"})
    with pytest.raises(InvalidDestination, match="invalid ssh host '-oProxyCommand=.*' in connection.ssh.host"):
        measure_remote(onnx_model, "onnxruntime", conn, **FAST)
    assert not list(tmp_path.glob("pwned*")), "the ProxyCommand ran"


def test_ssh_options_end_before_the_destination(sshd):
    target = _Target(addr="jetson.local", user="me", port=2222, key="/k", known_hosts="/kh", global_known_hosts=False,
                     connect_timeout_s=10)
    argv = ssh_base_argv(target)
    assert argv[-4:] == ["-p", "2222", "--", "me@jetson.local"]
    # and the real ssh still takes the command after `--` and the destination
    proc = subprocess.run(ssh_base_argv(_Target(addr="127.0.0.1", user=getpass.getuser(), port=sshd.port,
                                                key=str(sshd.client_key), known_hosts=str(sshd.known_hosts),
                                                global_known_hosts=False, connect_timeout_s=5))
                          + ["echo", "reached"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and proc.stdout.strip() == "reached", proc.stderr


def test_a_different_host_key_is_refused_before_anything_is_copied(sshd, onnx_model, workdir, tmp_path):
    other = keygen(tmp_path / "other_host_key")
    known = tmp_path / "known_hosts"
    known.write_text(known_hosts_line(sshd.port, other.with_suffix(".pub")))
    out = measure_remote(onnx_model, "onnxruntime", sshd.connection(workdir, known_hosts=str(known)), **FAST)
    assert out.status == "host-key", out.message
    assert "never accepts host keys blindly" in out.message and str(known) in out.message
    assert out.latency is None
    assert list(workdir.iterdir()) == [], "something was created on the device despite the wrong host key"


def test_an_empty_known_hosts_is_refused_not_trusted(sshd, onnx_model, workdir, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    out = measure_remote(onnx_model, "onnxruntime", sshd.connection(workdir, known_hosts=str(known)), **FAST)
    assert out.status == "host-key", out.message
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known}" in out.message
    assert known.read_text() == "", "the host key was written to known_hosts"
    assert list(workdir.iterdir()) == []


def test_a_key_the_device_does_not_accept_is_auth_failed(sshd, onnx_model, workdir, tmp_path):
    wrong = keygen(tmp_path / "wrong_key")
    out = measure_remote(onnx_model, "onnxruntime", sshd.connection(workdir, key=str(wrong)), **FAST)
    assert out.status == "auth-failed", out.message
    assert str(wrong) in out.message and "authorized_keys" in out.message


def test_a_port_with_nothing_listening_is_unreachable(sshd, onnx_model, workdir):
    out = measure_remote(onnx_model, "onnxruntime", sshd.connection(workdir, port=free_port()), **FAST)
    assert out.status == "unreachable", out.message
    assert "refused the connection" in out.message


def test_a_missing_runtime_on_the_device_says_what_to_install(sshd, workdir, tmp_path):
    model = tmp_path / "model.tflite"
    model.write_bytes(b"not read: the interpreter import fails first")
    python = shlex.join(python_without(tmp_path, "ai_edge_litert", "tflite_runtime", "tensorflow"))
    out = measure_remote(model, "tflite", sshd.connection(workdir, python=python), **FAST)
    assert out.status == "runtime-missing", out.message
    assert "pip install ai-edge-litert" in out.message
    assert list(workdir.iterdir()) == []


def test_a_run_past_the_timeout_is_timeout_and_cleaned_up(sshd, onnx_model, workdir):
    out = measure_remote(onnx_model, "onnxruntime", sshd.connection(workdir, python="sh -c 'sleep 6'"),
                         timeout_s=2.5, **FAST)
    assert out.status == "timeout", out.message
    assert "within 2.5 s" in out.message
    assert list(workdir.iterdir()) == []


# ----------------------------------------------------------------------------------- without ssh

def test_ssh_errors_are_classified():
    target = _Target(addr="jetson.local", user="me", port=22, key=None, known_hosts="/k", global_known_hosts=True,
                     connect_timeout_s=10)

    def status(stderr: str) -> RemoteOutcome:
        return _ssh_failure(subprocess.CompletedProcess([], 255, "", stderr), target)

    assert status("ssh: Could not resolve hostname jetson.local: Name or service not known").status == "unreachable"
    assert status("ssh: connect to host 10.0.0.9 port 22: No route to host").status == "unreachable"
    timed_out = status("ssh: connect to host 10.0.0.9 port 22: Connection timed out")
    assert timed_out.status == "unreachable" and "within 10 s" in timed_out.message
    changed = status("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification failed.")
    assert changed.status == "host-key" and "ssh-keygen -R 'jetson.local' -f /k" in changed.message
    assert status("me@jetson.local: Permission denied (publickey).").status == "auth-failed"
    assert status("kex_exchange_identification: something new").status == "failed"
    assert _ssh_failure(subprocess.CompletedProcess([], 1, "", "Permission denied"), target) is None


def test_remote_words_keep_the_home_tilde_and_quote_the_rest():
    assert _remote_word("~/venv's/bin/python") == "~/'venv'\"'\"'s/bin/python'"
    assert _remote_word("/opt/dev ice/py") == "'/opt/dev ice/py'"


TRTEXEC_LOG = """\
&&&& RUNNING TensorRT.trtexec [TensorRT v100300] [b17] # /usr/src/tensorrt/bin/trtexec --onnx=model.onnx --stronglyTyped
[08/01/2025-10:12:01] [I] TensorRT version: 10.3.0
[08/01/2025-10:12:01] [I] Loaded engine size: 12 MiB
[08/01/2025-10:12:14] [I] === Performance summary ===
[08/01/2025-10:12:14] [I] Throughput: 1268.55 qps
[08/01/2025-10:12:14] [I] Latency: min = 0.801514 ms, max = 1.40881 ms, mean = 0.828466 ms, median = 0.81958 ms, percentile(90%) = 0.847168 ms, percentile(95%) = 0.868652 ms, percentile(99%) = 1.04297 ms
[08/01/2025-10:12:14] [I] Enqueue Time: min = 0.167969 ms, max = 0.431641 ms, mean = 0.183447 ms, median = 0.177734 ms, percentile(90%) = 0.195312 ms, percentile(95%) = 0.208984 ms, percentile(99%) = 0.291016 ms
[08/01/2025-10:12:14] [I] H2D Latency: min = 0.0136719 ms, max = 0.0351562 ms, mean = 0.0149327 ms, median = 0.0146484 ms, percentile(90%) = 0.0157471 ms, percentile(95%) = 0.0163574 ms, percentile(99%) = 0.0214844 ms
[08/01/2025-10:12:14] [I] GPU Compute Time: min = 0.776245 ms, max = 1.37524 ms, mean = 0.78784 ms, median = 0.779297 ms, percentile(90%) = 0.804688 ms, percentile(95%) = 0.824219 ms, percentile(99%) = 1.00098 ms
[08/01/2025-10:12:14] [I] D2H Latency: min = 0.00292969 ms, max = 0.0177002 ms, mean = 0.00357666 ms, median = 0.00341797 ms, percentile(90%) = 0.00390625 ms, percentile(95%) = 0.00415039 ms, percentile(99%) = 0.00683594 ms
[08/01/2025-10:12:14] [I] Total Host Walltime: 3.00186 s
&&&& PASSED TensorRT.trtexec [TensorRT v100300] [b17] # /usr/src/tensorrt/bin/trtexec --onnx=model.onnx --stronglyTyped
"""


def test_trtexec_gpu_compute_time_is_parsed():
    runner = load_runner()
    parsed = runner.parse_trtexec(TRTEXEC_LOG)
    assert parsed == {"min_ms": 0.776245, "mean_ms": 0.78784, "p50_ms": 0.779297, "p90_ms": 0.804688,
                      "p99_ms": 1.00098, "runtime_version": "10.3.0"}
    assert runner.trtexec_version("[TensorRT v8601] # trtexec") == "8.6.1"
    assert runner.trtexec_version("[TensorRT v100300] # trtexec") == "10.3.0"
    with pytest.raises(runner.RunFailed, match="no 'GPU Compute Time' line"):
        runner.parse_trtexec("[E] Error[4]: cannot parse model\n&&&& FAILED TensorRT.trtexec")


def recording_trtexec(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in trtexec (the real one needs an NVIDIA GPU) that appends its argv and working directory to a
    log as one JSON line per call, writes the --saveEngine file it is asked for, and prints a real summary."""
    log = tmp_path / "trtexec-calls.jsonl"
    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f"""#!{sys.executable}
import json, os, sys
with open({str(log)!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv, "cwd": os.getcwd()}}) + "\\n")
for a in sys.argv[1:]:
    if a.startswith("--saveEngine="):
        open(a.split("=", 1)[1], "wb").close()
sys.stdout.write({TRTEXEC_LOG!r})
""")
    fake.chmod(0o755)
    return fake, log


def calls_of(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_runner_runs_the_given_trtexec_commands_in_the_artifact_folder(onnx_model, tmp_path):
    fake, log = recording_trtexec(tmp_path)
    build = [str(fake), "--onnx=tiny.onnx", "--saveEngine=tiny.engine", "--stronglyTyped"]
    timing = [str(fake), "--loadEngine=tiny.engine", "--shapes=input:4x3x16x16", "--warmUp=200", "--iterations=50",
              "--duration=0"]
    proc = run_runner("--artifact", str(onnx_model), "--runtime", "tensorrt", "--batch", "4", "--runs", "50",
                      "--trtexec-build", json.dumps(build), "--trtexec-time", json.dumps(timing))
    result = json.loads(proc.stdout.splitlines()[-1])
    assert proc.returncode == 0 and result["status"] == "ok", proc.stderr
    assert result["p50_ms"] == 0.779297 and result["runtime_version"] == "10.3.0"
    assert [c["argv"] for c in calls_of(log)] == [build, timing]
    assert {c["cwd"] for c in calls_of(log)} == {str(onnx_model.parent)}
    assert "engine built on the device with: " + shlex.join(build) in result["note"]
    assert "--warmUp=200 ms" in result["note"] and result["method"] == "trtexec GPU compute time"
    (onnx_model.parent / "tiny.engine").unlink()


def test_runner_fails_when_the_build_writes_no_engine(onnx_model, tmp_path):
    fake, log = recording_trtexec(tmp_path)
    build = ["true", "--onnx=tiny.onnx", "--saveEngine=none.engine"]  # exits 0, writes nothing
    proc = run_runner("--artifact", str(onnx_model), "--runtime", "tensorrt", "--trtexec-build", json.dumps(build),
                      "--trtexec-time", json.dumps([str(fake), "--loadEngine=none.engine"]))
    result = json.loads(proc.stdout.splitlines()[-1])
    assert proc.returncode == 4 and result == {"status": "failed",
                                               "message": "the engine build wrote no none.engine (trtexec exited 0)"}
    assert calls_of(log) == [], "an engine that was not built was timed"
    missing = run_runner("--artifact", str(onnx_model), "--runtime", "tensorrt",
                         "--trtexec-time", json.dumps(["/no/such/trtexec", "--loadEngine=x.engine"]))
    assert missing.returncode == 3 and "trtexec ('/no/such/trtexec') is not found" in missing.stdout


def run_runner(*args: str, python: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(python or [sys.executable]), str(RUNNER), *args], capture_output=True, text=True,
                          timeout=60)


def test_runner_locally_prints_one_json_result(onnx_model):
    import onnxruntime

    proc = run_runner("--artifact", str(onnx_model), "--runtime", "onnxruntime", "--batch", "3", "--warmup", "1",
                      "--runs", "10", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "ok" and result["runtime_version"] == onnxruntime.__version__
    assert 0 < result["min_ms"] <= result["p50_ms"] <= result["p99_ms"]
    assert (result["batch"], result["runs"], result["threads"], result["power_mode"]) == (3, 10, 1, None)
    assert set(result) >= {"python", "numpy", "platform", "machine", "mean_ms", "p90_ms", "warmup", "runtime"}


def test_runner_without_numpy_is_runtime_missing(onnx_model, tmp_path):
    proc = run_runner("--artifact", str(onnx_model), "--runtime", "onnxruntime",
                      python=python_without(tmp_path, "numpy"))
    assert proc.returncode == 3
    assert json.loads(proc.stdout.splitlines()[-1]) == {
        "status": "runtime-missing", "message": "numpy is not installed on this device (pip install numpy)"}


def test_runner_failure_is_failed_json(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    proc = run_runner("--artifact", str(bad), "--runtime", "onnxruntime", "--runs", "1")
    result = json.loads(proc.stdout.splitlines()[-1])
    assert proc.returncode == 4 and result["status"] == "failed" and result["message"]


def test_power_mode_command_failures_are_explained():
    runner = load_runner()
    assert runner.power_mode("/bin/echo '  MAXN  '") == "MAXN"
    assert runner.power_mode("/no/such/nvpmodel -q") == "unknown: /no/such/nvpmodel not found"
    failing = "/bin/sh -c 'echo denied >&2; exit 2'"
    assert runner.power_mode(failing) == f"unknown: '{failing}' exited 2: denied"
    assert runner.power_mode(None) is None
