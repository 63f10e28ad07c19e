"""Device profiles: the shipped ones are complete, and a bad profile fails with the field it got wrong."""

from __future__ import annotations

import pytest
import yaml

from rescompress.devices import DeviceProfile, available_devices, group_figures, load_device
from rescompress.errors import RecipeError, UnknownNameError

REQUIRED = ("jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "galaxy-s24", "raspberry-pi-5", "host-cpu")


def test_the_shipped_profiles_cover_the_edge_devices():
    assert set(REQUIRED) <= set(available_devices())


@pytest.mark.parametrize("name", [n for n in REQUIRED if n != "host-cpu"])
def test_remote_profiles_say_how_latency_is_known(name):
    dev = load_device(name)
    assert dev.power_mode_command or "jetson" not in name
    for runtime, rt in dev.runtimes.items():
        assert rt.precisions, runtime
        unit = dev.compute[rt.unit]  # every runtime runs on a described unit with peak figures
        assert unit.memory_gbps > 0 and unit.source
        assert all(unit.peak_tops[p] > 0 for p in rt.precisions)
        assert dev.latency_plan(runtime) == "estimated"  # no connection configured: the roofline estimate
    assert dev.published, "published reference latencies calibrate and check the estimate"
    for fig in dev.published:
        assert fig.source and fig.runtime in dev.runtimes
    # an estimate group calibrates on at least one figure that is not held out
    for rt in dev.runtimes.values():
        assert any(f.use == "calibrate" for _, f in group_figures(rt.estimate_group)), rt.estimate_group


def test_the_jetsons_publish_resnet18_and_resnet50():
    for name in ("jetson-agx-orin", "jetson-orin-nano"):
        assert {"resnet18", "resnet50"} <= {f.model for f in load_device(name).published}


def test_host_cpu_is_measured_here():
    dev = load_device("host-cpu")
    assert all(dev.latency_plan(rt) == "measured" for rt in dev.runtimes)
    assert list(dev.runtimes) == ["torch", "onnxruntime", "tflite"]  # the short list form
    assert dev.precisions("onnxruntime") == ["fp32", "fp16", "int8"]


def test_a_connection_makes_latency_remote():
    data = yaml.safe_load(open(available_devices()["raspberry-pi-5"], encoding="utf-8"))
    data["connection"] = {"ssh": {"host": "pi.local", "user": "pi"}}
    dev = DeviceProfile.model_validate(data)
    assert dev.latency_plan("tflite") == "measured-remote"
    assert dev.ssh.destination == "pi@pi.local" and dev.ssh.port == 22


def _write(tmp_path, data) -> str:
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def _base() -> dict:
    return {"name": "board", "runtimes": {"tflite": {"unit": "cpu", "estimate_group": "g"}},
            "compute": {"cpu": {"peak_tops": {"fp32": 0.1, "fp16": 0.2, "int8": 0.4}, "memory_gbps": 10}}}


@pytest.mark.parametrize("change, match", [
    (lambda d: d["runtimes"]["tflite"].update(unit="gpu"), r"runtimes.tflite.unit 'gpu' is not a key of compute \(cpu\)"),
    (lambda d: d["compute"]["cpu"]["peak_tops"].pop("int8"), r"runs int8 on unit 'cpu', whose peak_tops has no figure"),
    (lambda d: d["compute"]["cpu"]["peak_tops"].update(fp32=0), r"peak_tops.fp32 must be > 0"),
    (lambda d: d.update(published=[{"model": "resnet18", "runtime": "tensorrt", "precision": "fp16",
                                     "latency_ms": 1.0, "use": "holdout", "source": "a paper"}]),
     r"published\[0\].runtime 'tensorrt' is not one of runtimes \(tflite\)"),
    (lambda d: d.update(published=[{"model": "resnet18", "runtime": "tflite", "precision": "fp16",
                                     "latency_ms": 1.0, "use": "test", "source": "a paper"}]),
     r"published.0.use: Input should be 'calibrate' or 'holdout'"),
    (lambda d: d.update(latency_source="measured-remote"), r"measured-remote needs connection.ssh"),
    (lambda d: d.update(connection={"ssh": {"host": "x", "prot": 22}}), r"connection.ssh.prot: Extra inputs"),
    (lambda d: d.update(connection={"ssh": {"host": "jetson", "user": "-oProxyCommand=touch /tmp/x"}}),
     r"connection.ssh: Value error, invalid ssh user '-oProxyCommand=touch /tmp/x' in connection.ssh.user"),
    (lambda d: d.update(connection={"ssh": {"host": "-oProxyCommand=x"}}),
     r"connection.ssh: Value error, invalid ssh host '-oProxyCommand=x'"),
    (lambda d: d.update(cpu={"isa": ["asimddp"]}), r"cpu: Value error, cpu.isa lists features .* give cpu.arch"),
    (lambda d: d.update(cpu={"arch": "arm64", "isa": "host"}), r"cpu.arch is read from this host .* drop cpu.arch"),
    (lambda d: d.update(cpu={"arch": "riscv64", "isa": []}), r"cpu.arch: Input should be 'arm64' or 'x86_64'"),
])
def test_a_bad_profile_names_its_field(tmp_path, change, match):
    data = _base()
    load_device(_write(tmp_path, data))  # the base is valid
    change(data)
    with pytest.raises(RecipeError, match=match):
        load_device(_write(tmp_path, data))


def test_unknown_device_suggests_a_name():
    with pytest.raises(UnknownNameError, match="did you mean 'jetson-orin-nx'"):
        load_device("jetson-orin-nz")


def test_a_recipe_profile_joins_the_estimate_pool():
    from rescompress.devices import PublishedLatency, estimate_pool

    pi = load_device("raspberry-pi-5")
    copy = pi.model_copy(update={"name": "pi-copy"})
    assert len(group_figures("arm-cortex-a-cpu", estimate_pool([copy]))) == 2  # a copy adds no evidence
    own = PublishedLatency(model="resnet34", runtime="tflite", precision="fp16", latency_ms=90.0,
                           source="measured on our own board")
    mine = pi.model_copy(update={"name": "my-pi", "published": [own]})
    figs = group_figures("arm-cortex-a-cpu", estimate_pool([mine]))
    assert len(figs) == 3 and ("my-pi", "resnet34") in {(d.name, f.model) for d, f in figs}


def test_the_shipped_profiles_describe_their_cpu():
    for name in ("jetson-agx-orin", "jetson-orin-nx", "jetson-orin-nano", "raspberry-pi-5"):
        cpu = load_device(name).cpu_features()  # Cortex-A78AE and Cortex-A76: ARMv8.2-A with dot product
        assert (cpu.arch, cpu.int8_dot, cpu.where) == ("arm64", True, "the profile"), name
        assert "asimddp" in cpu.isa and "i8mm" not in cpu.isa
    assert load_device("host-cpu").cpu.isa == "host"  # read from this machine, when needed
    board = DeviceProfile.model_validate(_base()).cpu_features()
    assert board.int8_dot is None and board.where.startswith("unknown: profile board has no `cpu` section")


def test_host_cpu_features_come_from_cpuinfo(tmp_path, monkeypatch):
    from rescompress.devices import host_cpu

    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 asimdhp asimddp\n", encoding="utf-8")
    cpu = host_cpu(arm)
    assert (cpu.arch, cpu.int8_dot) == ("arm64", True) and "asimddp" in cpu.isa and str(arm) in cpu.where
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n", encoding="utf-8")
    assert (host_cpu(x86).arch, host_cpu(x86).int8_dot) == ("x86_64", False)
    missing = host_cpu(tmp_path / "none")
    assert missing.isa is None and missing.int8_dot is None and missing.where.startswith("unknown: ")


def _local_profile(directory, name: str, **fields):
    """A copy of a built-in profile in `directory`/devices/, with `fields` changed."""
    data = yaml.safe_load(open(available_devices()[fields.pop("base", name)], encoding="utf-8"))
    data.update(name=name, **fields)
    path = directory / "devices" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_each_profile_records_its_file_and_hash(tmp_path, monkeypatch):
    import hashlib
    import warnings

    from rescompress.devices import BUILTIN_DIR

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a built-in profile that nothing shadows loads without a warning
        dev = load_device("jetson-agx-orin")
    builtin = BUILTIN_DIR / "jetson-agx-orin.yaml"
    assert dev.provenance() == {"profile": {"path": str(builtin.resolve()), "builtin": True,
                                            "sha256": hashlib.sha256(builtin.read_bytes()).hexdigest()}}
    mine = _local_profile(tmp_path, "my-board", base="jetson-agx-orin")
    record = load_device(str(mine)).provenance()["profile"]
    assert record == {"path": str(mine.resolve()), "builtin": False,
                      "sha256": hashlib.sha256(mine.read_bytes()).hexdigest()}
    assert DeviceProfile.model_validate(_base()).provenance() == {}  # built in code: no file to name


def test_a_local_profile_that_shadows_a_builtin_one_warns(tmp_path, monkeypatch):
    from rescompress.devices import ProfileShadowWarning

    local = _local_profile(tmp_path, "jetson-orin-nano", trtexec="/opt/other/trtexec")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(ProfileShadowWarning, match=r"device 'jetson-orin-nano': using .*devices/jetson-orin-nano.yaml, "
                                                  r"which shadows the built-in profile"):
        dev = load_device("jetson-orin-nano")
    assert dev.trtexec == "/opt/other/trtexec"  # the local file is the one used, and the report says so
    assert dev.provenance()["profile"]["path"] == str(local.resolve())
    assert dev.provenance()["profile"]["builtin"] is False


def test_the_estimate_pool_ignores_unnamed_local_profiles(tmp_path, monkeypatch):
    from rescompress.bench.estimate import calibrate
    from rescompress.devices import BUILTIN_DIR, PublishedLatency, estimate_pool

    odd = PublishedLatency(model="resnet34", runtime="tflite", precision="fp16", latency_ms=900.0,
                           source="a stray file")
    _local_profile(tmp_path, "stray-pi", base="raspberry-pi-5", published=[odd.model_dump(mode="json")])
    builtin = calibrate("arm-cortex-a-cpu", estimate_pool([load_device("raspberry-pi-5")]))
    monkeypatch.chdir(tmp_path)
    assert "stray-pi" in available_devices()  # listed and loadable by name, but not read unless named
    pool = estimate_pool([load_device("raspberry-pi-5")])
    assert {d.name for d in pool} == {p.stem for p in BUILTIN_DIR.glob("*.yaml")}
    assert "stray-pi" not in {d.name for d, _ in group_figures("arm-cortex-a-cpu")}
    assert calibrate("arm-cortex-a-cpu", pool).params == builtin.params
    named = estimate_pool([load_device("stray-pi")])  # the recipe names it: its figures join the group
    assert ("stray-pi", "resnet34") in {(d.name, f.model) for d, f in group_figures("arm-cortex-a-cpu", named)}
