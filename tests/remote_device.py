"""A throwaway "device" for remote-measurement tests: a real sshd on 127.0.0.1 with its own host key and one
authorized client key, reached with this venv's Python (numpy + onnxruntime) as the device's Python."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import ci

from rescompress.devices import SSHConnection

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path


def known_hosts_line(port: int, pub: Path) -> str:
    kind, key = pub.read_text().split()[:2]
    return f"[127.0.0.1]:{port} {kind} {key}\n"


@dataclass
class Sshd:
    port: int
    dir: Path
    client_key: Path
    known_hosts: Path

    def connection(self, workdir: Path, **overrides) -> SSHConnection:
        fields = dict(host="127.0.0.1", user=getpass.getuser(), port=self.port, key=str(self.client_key),
                      known_hosts=str(self.known_hosts), python=sys.executable, workdir=str(workdir),
                      connect_timeout_s=5)
        return SSHConnection(**{**fields, **overrides})


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited with {proc.returncode}: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"sshd did not listen on {port} within {timeout_s} s: {log.read_text()}")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> Sshd:
    """A real sshd on 127.0.0.1 (free port, own host key, one authorized key), with a known_hosts for it."""
    missing = [tool for tool in (SSHD, "ssh", "ssh-keygen") if shutil.which(tool) is None]
    if missing:
        ci.missing(f"needs OpenSSH ({', '.join(missing)} not found; make sshd installs it)")
    d = tmp_path_factory.mktemp("sshd")
    host_key, client_key = keygen(d / "host_key"), keygen(d / "client_key")
    (d / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    port = free_port()
    cfg = d / "sshd_config"
    cfg.write_text("\n".join([
        "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {host_key}", f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
        "UseDNS no", "PrintMotd no", "PrintLastLog no", ""]))
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)
    log = d / "sshd.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdout=err, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, log)
        known = d / "known_hosts"
        known.write_text(known_hosts_line(port, host_key.with_suffix(".pub")))
        yield Sshd(port=port, dir=d, client_key=client_key, known_hosts=known)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


BLOCKER = '''\
"""Runs a script with some top-level packages made unimportable (a device that lacks them)."""
import importlib.abc, runpy, sys

BLOCKED = {blocked!r}


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def python_without(tmp_path: Path, *modules: str) -> list[str]:
    """A command line for this Python with `modules` unimportable."""
    boot = tmp_path / "python_without.py"
    boot.write_text(BLOCKER.format(blocked=set(modules)))
    return [sys.executable, str(boot)]


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    """A small conv net (dynamic batch, 3x16x16 input) with its weights in an external-data file."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal((8, 10)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="tiny.onnx.data", size_threshold=0)
    assert (path.parent / "tiny.onnx.data").is_file()
    return path
