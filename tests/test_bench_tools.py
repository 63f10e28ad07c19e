"""The `make bench` scripts: the results collector on hand-written part files, and the pipeline-cost and
default-paths benchmarks on a real tiny run (onnxruntime's quantize_static and torch-pruning really run); and
that every third-party module the package imports is declared in pyproject.toml."""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import importlib.util
import json
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.conftest import TINY_RECIPE, write_recipe

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _provenance(cpu: str, cores: int, measured: str, python: str, **versions: str) -> dict:
    return {"rescompress": "0.1.0", "python": python, "platform": f"Linux-5.15.0-{cores}-generic-x86_64-with-glibc2.35",
            "processor": cpu, "cpu_count": cores, "measured": measured, "onnxruntime": "1.31.1", **versions}


XEON = _provenance("Intel(R) Xeon(R) Gold 6338N CPU @ 2.20GHz", 32, "2025-03-04T09:12:00+00:00", "3.10.12",
                   torch="2.13.0+cpu")
ARM = _provenance("Neoverse-N1", 8, "2025-03-05T17:40:00+00:00", "3.12.3", torch="2.12.0")


def _pruning_part(model: str, size: int, efficiency_2x: float, provenance: dict | None = None) -> dict:
    rows = [{"runtime": "onnxruntime", "model": "dense", "macs": 100, "macs_reduction": 1.0, "p50_ms": 2.0,
             "p90_ms": 2.2, "speedup": 1.0, "efficiency": None},
            {"runtime": "onnxruntime", "model": "2x", "macs": 50, "macs_reduction": 2.0, "p50_ms": 2.0 / (2 * efficiency_2x),
             "p90_ms": 1.5, "speedup": 2 * efficiency_2x, "efficiency": efficiency_2x}]
    return {"model": model, "size": size, "threads": 2, "rounds": 3, "runs": 10, "results": rows,
            "provenance": provenance or {"onnxruntime": "1.0"}}


def _defaults_part(delta_pt: float, ci: list[float] | None, provenance: dict | None = None) -> dict:
    def row(model: str, top1: float, p50: float) -> dict:
        return {"model": model, "how": "…", "top1": top1, "delta_top1_pt": (top1 - 0.9) * 100, "p50_ms": p50,
                "p90_ms": p50 * 1.2, "speedup_vs_baseline": 0.5 / p50, "macs": 10, "size_bytes": 1000}

    rows = [row("baseline fp32", 0.9, 0.5), row("(a) ort quantize_static defaults", 0.9, 1.0),
            row("(a') ort quantize_static U8S8 per-channel", 0.89, 0.6),
            row("(c) rescompress int8", 0.899, 0.4)]
    verdict = {"speedup_vs_ort_default": 2.5, "delta_top1_pt_vs_ort_default": delta_pt,
               "images_disagreeing": 40, "at_least_as_fast_and_accurate": delta_pt >= 0}
    if ci is not None:
        verdict["delta_top1_pt_vs_ort_default_ci95"] = ci
    return {"dataset": {"name": "fashion_mnist", "sizes": {"test": 10000}}, "recipe": "fm", "threads": 2,
            "rounds": 5, "runs": 200, "calibration_images": 512, "finetune_epochs": 6, "results": rows,
            "verdict": verdict, "provenance": provenance or {"onnxruntime": "1.0"}}


def _write(folder: Path, name: str, data: dict) -> None:
    (folder / name).write_text(json.dumps(data))


def test_results_collects_the_parts_and_checks_the_claims(tmp_path):
    results = load_tool("bench_results")
    _write(tmp_path, "pruning_resnet18_224.json", _pruning_part("resnet18", 224, 0.9))
    _write(tmp_path, "pruning_resnet20_32.json", _pruning_part("resnet20", 32, 0.6))
    _write(tmp_path, "defaults_fashion_mnist.json", _defaults_part(0.28, [-0.07, 0.63]))

    assert results.main(["--dir", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "results.json").read_text())
    verdicts = {c["claim"]: c["verdict"] for c in out["checks"]}
    assert verdicts == {
        "rescompress int8 is at least as fast as onnxruntime's quantize_static with its defaults and with its x86 "
        "advice (Fashion-MNIST, onnxruntime)": "yes",
        "rescompress int8 is at least as accurate as onnxruntime's quantize_static with its defaults "
        "(Fashion-MNIST, onnxruntime)": "no worse within noise",
        "pruning efficiency at 2x fewer MACs ≥ 0.8 in onnxruntime (resnet18 224²)": "yes",
        "pruning efficiency at 2x fewer MACs ≥ 0.8 in onnxruntime (resnet20 32²)": "no",
    }
    md = (tmp_path / "results.md").read_text()
    # speed against the default (p50 1.0 / 0.4) and, beside it, against the x86 setting (0.6 / 0.4)
    assert "| yes | 2.50× the speed of its defaults (S8S8 per-tensor: 0.50× of fp32 here); 1.50× the speed of " \
           "U8S8 per-channel" in md
    assert "| no worse within noise | +0.28 pt top-1 (95 % interval -0.07 to +0.63 pt" in md
    assert "| **no** | 1.20× faster for 2.00× fewer MACs" in md
    assert "Not run: int8_onnxruntime_resnet18.json missing." in md
    assert "Not run: pipeline_cost.json missing." in md
    assert "| (c) rescompress int8 | 89.90 | -0.10 | 0.400 | 0.480 | 1.25× |" in md


@pytest.mark.parametrize("point, ci, verdict", [
    (0.5, [0.1, 0.9], "better"),
    (-0.5, [-0.9, -0.1], "worse"),
    (0.28, [-0.07, 0.63], "no worse within noise"),
    (-0.1, [-0.4, 0.2], "within noise"),
    (0.0, [0.0, 0.0], "no worse within noise"),
])
def test_accuracy_verdict_follows_the_interval_not_the_point_estimate(point, ci, verdict):
    assert load_tool("bench_results").interval_verdict(point, ci) == verdict


@pytest.mark.parametrize("delta, ci, verdict", [(0.4, [0.1, 0.7], "better"), (-0.4, [-0.7, -0.1], "**worse**"),
                                                (-0.1, [-0.4, 0.2], "within noise")])
def test_accuracy_check_states_the_intervals_verdict(tmp_path, delta, ci, verdict):
    _write(tmp_path, "defaults_fashion_mnist.json", _defaults_part(delta, ci))
    assert load_tool("bench_results").main(["--dir", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert f"(Fashion-MNIST, onnxruntime) | {verdict} | {delta:+.2f} pt top-1" in md


def test_provenance_comes_from_each_file_not_from_the_collectors_host(tmp_path):
    """Two parts measured on different machines and dates: each table names its own, and nothing of the host
    that runs the collector (its CPU, platform, Python, today's date) appears."""
    results = load_tool("bench_results")
    _write(tmp_path, "pruning_resnet18_224.json", _pruning_part("resnet18", 224, 0.9, XEON))
    _write(tmp_path, "defaults_fashion_mnist.json", _defaults_part(0.28, [-0.07, 0.63], ARM))
    assert results.main(["--dir", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    text = md + (tmp_path / "results.json").read_text()

    assert "**Machine:** the files were measured on different machines; each table names its own." in md
    assert ("**resnet18 224×224**, 2 threads, 3 rounds × 10 runs\n\nMeasured on 2025-03-04. **Machine:** "
            "Intel(R) Xeon(R) Gold 6338N CPU @ 2.20GHz, 32 cores; SIMD not recorded; "
            "Linux-5.15.0-32-generic-x86_64-with-glibc2.35, Python 3.10.12.") in md
    section = md.split("## 3. Against the default paths")[1]
    assert section.split("\n\n")[1] == ("Measured on 2025-03-05. **Machine:** Neoverse-N1, 8 cores; SIMD not "
                                        "recorded; Linux-5.15.0-8-generic-x86_64-with-glibc2.35, Python 3.12.3.")
    assert "- torch: 2.13.0+cpu (pruning_resnet18_224.json); 2.12.0 (defaults_fashion_mnist.json)" in md
    assert "- onnxruntime: 1.31.1\n" in md
    for own in (platform.platform(), f"Python {platform.python_version()}", _host_cpu(),
                datetime.now(timezone.utc).date().isoformat()):
        assert own not in text
    out = json.loads((tmp_path / "results.json").read_text())
    assert not out["provenance"]["same_machine"] and not out["provenance"]["same_date"]
    assert "generated" not in out and "machine" not in out


def test_one_machine_line_when_every_file_agrees(tmp_path):
    results = load_tool("bench_results")
    flagged = {**_pruning_part("resnet20", 32, 0.6, XEON), "cpu_flags": ["avx2", "avx512_vnni"]}
    _write(tmp_path, "pruning_resnet18_224.json", _pruning_part("resnet18", 224, 0.9, XEON))
    _write(tmp_path, "pruning_resnet20_32.json", flagged)
    assert results.main(["--dir", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert md.count("**Machine:**") == 1 and "Measured on" not in md
    assert "Measured with `make bench` on 2025-03-04.\n\n**Machine:** Intel(R) Xeon(R) Gold 6338N CPU @ 2.20GHz, " \
           "32 cores; SIMD avx2, avx512_vnni (as pruning_resnet20_32.json record it); " \
           "Linux-5.15.0-32-generic-x86_64-with-glibc2.35, Python 3.10.12." in md
    assert "- torch: 2.13.0+cpu\n" in md


def _host_cpu() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                platform.machine())


def _requirement_name(spec: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", spec.strip(), maxsplit=1)[0]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_of_the_package_is_declared():
    """Each top-level module that rescompress/ imports, outside the standard library, comes from a distribution
    pyproject.toml declares (a core dependency or an extra), or one the tensorflow extra's install script adds
    (tf-keras, installed without its dependencies)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
    script = (TOOLS / "install_tensorflow_extra.sh").read_text(encoding="utf-8")
    specs += re.findall(r'--no-deps "([^"]+)"', script)
    declared = {_normalise(_requirement_name(s)) for s in specs}

    imported: dict[str, set[str]] = {}
    for path in (ROOT / "rescompress").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "rescompress" and top not in sys.stdlib_module_names:
                    imported.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    assert {"numpy", "torch", "scipy", "PIL"} <= set(imported)

    providers = importlib.metadata.packages_distributions()
    undeclared = {module: sorted(files) for module, files in imported.items()
                  # a module whose distribution is not installed here (tensorrt) is taken to be named alike
                  if not {_normalise(d) for d in providers.get(module, [module])} & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


@pytest.mark.slow
def test_pipeline_cost_and_default_paths_on_a_tiny_run(tmp_path):
    data = copy.deepcopy(TINY_RECIPE)
    data["stages"] = [{"prune": {"macs_reduction": 1.5, "round_to": 8, "epochs": 1}}, {"qat": {"epochs": 1}}]
    data["export"] = [{"onnx": {"precision": "fp32"}}, {"onnx": {"precision": "int8"}}]
    recipe = write_recipe(tmp_path / "tiny.yaml", data)

    pipeline_json = tmp_path / "pipeline_cost.json"
    assert load_tool("bench_pipeline").main([str(recipe), "--runs-dir", str(tmp_path / "runs"),
                                             "--out", str(pipeline_json)]) == 0
    (cost,) = json.loads(pipeline_json.read_text())["recipes"]
    steps = {s["step"]: s for s in cost["steps"]}
    assert list(steps) == ["baseline", "01-prune", "02-qat", "export", "measure"]
    assert steps["baseline"]["train_seconds"] > 0 and steps["export"]["train_seconds"] == 0
    assert cost["command_seconds"] >= cost["steps_seconds"] >= cost["train_seconds"] > 0
    assert 0 < cost["outside_training_share"] < 1

    out = tmp_path / "defaults.json"
    assert load_tool("bench_defaults").main(["--run", cost["run_dir"], "--runs", "3", "--rounds", "1",
                                             "--warmup", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["model"]: r for r in result["results"]}
    assert list(rows) == ["baseline fp32", "(a) ort quantize_static defaults",
                          "(a') ort quantize_static U8S8 per-channel", "(b) torch-pruning magnitude + fine-tune",
                          "(c) rescompress fp32", "(c) rescompress int8"]
    base = rows["baseline fp32"]
    for row in rows.values():
        assert 0.0 <= row["top1"] <= 1.0 and 0 < row["p50_ms"] and row["size_bytes"] > 0
        assert row["delta_top1_pt"] == pytest.approx((row["top1"] - base["top1"]) * 100)
    assert rows["(a) ort quantize_static defaults"]["macs"] == base["macs"]
    assert rows["(a) ort quantize_static defaults"]["size_bytes"] < base["size_bytes"] / 2  # int8 weights
    assert rows["(b) torch-pruning magnitude + fine-tune"]["macs_reduction"] >= 1.5
    assert rows["(c) rescompress int8"]["macs_reduction"] >= 1.5
    assert result["finetune_epochs"] == 2  # as many as the recipe's stages train
    v = result["verdict"]
    assert v["at_least_as_fast_and_accurate"] == (v["speedup_vs_ort_default"] >= 1
                                                  and v["delta_top1_pt_vs_ort_default"] >= 0)
