#!/usr/bin/env bash
# The GPU check, in one run on a bare CUDA machine without network: install rescompress against the machine's
# own torch, run every test marked `cuda`, time training throughput (ResNet-50 224², fp32 and bf16,
# channels_last: rescompress's fit loop must reach 0.9x a plain PyTorch loop), write ONE JSON summary.
#
#   bash tools/gpu_wheels.sh      # first, on a machine with network: fills wheels/ (git-ignored, < 64 MiB)
#   bash tools/gpu_check.sh       # then on the CUDA machine, with wheels/ carried along
#
# Writes $OUT/gpu_check.json when $OUT is set, else ./gpu_check.json, and its logs, the pytest JUnit file and
# the benchmark JSONs beside it in gpu_check/. Exits 0 when every cuda test passed and both throughput
# ratios are at least 0.9. Budget: about 8 minutes in all (install < 1 min, tests <= 4 min, benchmarks
# with what is left).
#
# Install: the machine keeps its torch; every distribution of tools/gpu_packages.txt whose pinned version it
# does not have is unpacked from wheels/ into a private directory put first on PYTHONPATH (no pip, no
# network, nothing written to the machine's site-packages), and the repository itself is imported from its
# checkout (PYTHONPATH, the same as `pip install --no-deps -e .`). scikit-learn (with scipy ~50 MB) does not
# fit the carry: the tests' digits come from wheels/digits.npz (scikit-learn's own 1,797 images) through a
# stand-in `sklearn.datasets.load_digits` in that private directory, used only when sklearn is missing.
#
# Dry run on a machine without a GPU (checks this script and the tests' logic, proves nothing about CUDA):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_PYTHON=.venv/bin/python bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
START=$(date +%s)
PY=${GPU_CHECK_PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
OUT_DIR=${OUT:-$REPO}
DETAIL=$OUT_DIR/gpu_check
SUMMARY=$OUT_DIR/gpu_check.json
TOTAL_BUDGET=${GPU_CHECK_BUDGET_S:-470}
mkdir -p "$DETAIL"
SITE=$(mktemp -d)/site
mkdir -p "$SITE"
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[gpu_check $(elapsed)s] $*" | tee -a "$DETAIL/gpu_check.log"; }

# ---------------------------------------------------------------------------------------------- machine
log "python: $PY, device: $DEVICE, output: $SUMMARY"
"$PY" - "$DETAIL/env.json" <<'PY' 2>&1 | tee -a "$DETAIL/gpu_check.log"
import json, platform, sys
env = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    env.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda_available=torch.cuda.is_available(),
               device_count=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if torch.cuda.is_available():
        env.update(device_name=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
except Exception as exc:  # reported in the summary
    env["torch_error"] = f"{type(exc).__name__}: {exc}"
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env))
PY

# ---------------------------------------------------------------------------------------------- install
T0=$(date +%s)
"$PY" - "$REPO" "$SITE" "$DETAIL/install.json" <<'PY' 2>&1 | tee -a "$DETAIL/gpu_check.log"
"""Unpack every listed wheel whose pinned version the machine lacks into SITE; add the digits stand-in."""
import json, re, sys, zipfile
from importlib import metadata
from pathlib import Path

repo, site, record = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
wheels = repo / "wheels"
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
done = {"installed": [], "kept": [], "missing_wheels": [], "stand_ins": []}
for line in (repo / "tools" / "gpu_packages.txt").read_text().splitlines():
    if not line.strip() or line.lstrip().startswith("#"):
        continue
    spec, _module = line.split()[:2]
    name, version = spec.split("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have == version:
        done["kept"].append(f"{name} {have}")
        continue
    files = [w for w in sorted(wheels.glob("*.whl"))  # NAME-VERSION-TAGS.whl
             if norm(w.name.split("-")[0]) == norm(name) and w.name.split("-")[1] == version]
    if not files:
        done["missing_wheels"].append(f"{spec} (machine has {have})")
        continue
    with zipfile.ZipFile(files[0]) as whl:
        for member in whl.namelist():
            parts = member.split("/")
            if parts[0].endswith(".data"):  # NAME.data/purelib|platlib/... go to the root; scripts, headers: not needed
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                target = site.joinpath(*parts[2:])
            else:
                target = site / member
            if member.endswith("/"):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(whl.read(member))
    done["installed"].append(f"{name} {version}" + (f" (machine has {have})" if have else ""))
try:
    import sklearn  # noqa: F401
except ImportError:
    digits = wheels / "digits.npz"
    pkg = site / "sklearn" / "datasets"
    pkg.mkdir(parents=True, exist_ok=True)
    (site / "sklearn" / "__init__.py").write_text('"""Stand-in for the GPU check: only datasets.load_digits."""\n')
    (pkg / "__init__.py").write_text(
        '"""scikit-learn\'s digits (the 1,797 images of sklearn.datasets.load_digits, saved by tools/gpu_wheels.sh)."""\n'
        "import numpy as np\nfrom types import SimpleNamespace\n\n"
        "def load_digits():\n"
        f"    d = np.load({str(digits)!r})\n"
        "    return SimpleNamespace(images=d['images'], target=d['target'], target_names=d['target_names'],\n"
        "                           data=d['images'].reshape(len(d['images']), -1))\n")
    done["stand_ins"].append(f"sklearn.datasets.load_digits from {digits}" + ("" if digits.is_file() else " (MISSING)"))
record.write_text(json.dumps(done, indent=2))
print(json.dumps(done))
PY
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
IMPORT_LOG=$DETAIL/import.log
if "$PY" -c "import rescompress.train, rescompress.compress.pt2e, rescompress.compress.prune, rescompress.export.onnx, rescompress.cli" >"$IMPORT_LOG" 2>&1; then
    IMPORT_OK=1
else
    IMPORT_OK=0
    log "rescompress does not import here:"; tail -5 "$IMPORT_LOG" | tee -a "$DETAIL/gpu_check.log"
fi
INSTALL_S=$(( $(date +%s) - T0 ))
log "install done (${INSTALL_S}s), import ok: $IMPORT_OK"

# ---------------------------------------------------------------------------------------------- tests
T0=$(date +%s)
TEST_RC=-1
if [ "$IMPORT_OK" = 1 ]; then
    FILES=$(grep -l "pytest.mark.cuda" tests/test_*.py | tr '\n' ' ')
    log "pytest -m cuda $FILES"
    # only the plugins named here: a machine's own pytest plugins may not match the pytest unpacked above
    RESCOMPRESS_CUDA_TESTS_ON=$DEVICE PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 250 "$PY" -m pytest -m cuda -q \
        -p no:cacheprovider -p pytest_timeout -o timeout=150 \
        --junitxml="$DETAIL/junit.xml" $FILES >"$DETAIL/pytest.log" 2>&1
    TEST_RC=$?
    tail -15 "$DETAIL/pytest.log" | tee -a "$DETAIL/gpu_check.log"
fi
TESTS_S=$(( $(date +%s) - T0 ))

# ---------------------------------------------------------------------------------------------- benchmark
T0=$(date +%s)
for PREC in fp32 bf16; do
    LEFT=$(( TOTAL_BUDGET - $(elapsed) ))
    if [ "$IMPORT_OK" != 1 ] || [ "$LEFT" -lt 30 ]; then
        log "benchmark $PREC skipped (import ok $IMPORT_OK, ${LEFT}s left)"
        continue
    fi
    if [ "$PREC" = fp32 ]; then BUDGET=$(( LEFT / 2 )); else BUDGET=$LEFT; fi
    if [ "$DEVICE" = cpu ]; then
        ARGS="--model resnet18 --size 32 --device cpu --batch-size 4 --steps 2 --rounds 2 --warmup 1"
    else
        ARGS="--model resnet50 --size 224 --device $DEVICE --batch-size 128 --steps 12 --rounds 6 --warmup 1"
    fi
    log "benchmark $PREC channels_last (at most ${BUDGET}s): $ARGS"
    timeout "$BUDGET" "$PY" tools/bench_train_throughput.py $ARGS --precision "$PREC" --channels-last --quiet \
        --out "$DETAIL/bench_$PREC.json" >"$DETAIL/bench_$PREC.log" 2>&1
    echo "rc=$?" >>"$DETAIL/bench_$PREC.log"
    tail -3 "$DETAIL/bench_$PREC.log" | tee -a "$DETAIL/gpu_check.log"
done
BENCH_S=$(( $(date +%s) - T0 ))

# ---------------------------------------------------------------------------------------------- summary
"$PY" - "$DETAIL" "$SUMMARY" "$DEVICE" "$TEST_RC" "$IMPORT_OK" "$INSTALL_S" "$TESTS_S" "$BENCH_S" "$(elapsed)" <<'PY'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

detail, summary = Path(sys.argv[1]), Path(sys.argv[2])
device, test_rc, import_ok = sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
install_s, tests_s, bench_s, total_s = (int(v) for v in sys.argv[6:10])
read = lambda p: json.loads(p.read_text()) if p.is_file() else None
out = {"check": "gpu_check", "device": device, "dry_run_on_cpu": device == "cpu", "env": read(detail / "env.json"),
       "install": read(detail / "install.json"), "import_ok": import_ok,
       "seconds": {"install": install_s, "tests": tests_s, "benchmark": bench_s, "total": total_s}}
if not import_ok and (detail / "import.log").is_file():
    out["import_error"] = (detail / "import.log").read_text()[-2000:]

tests = {"exit_code": test_rc, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skips": []}
junit = detail / "junit.xml"
if junit.is_file():
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            tests["failed" if bad.tag == "failure" else "errors"] += 1
            tests["failures"].append({"test": name, "message": (bad.get("message") or "")[:400],
                                      "detail": (bad.text or "")[-1500:]})
        elif skip is not None:
            tests["skipped"] += 1
            tests["skips"].append(f"{name}: {(skip.get('message') or '')[:200]}")
        else:
            tests["passed"] += 1
elif test_rc == 124:
    tests["note"] = "pytest ran past its time limit (no JUnit file): see gpu_check/pytest.log"
out["tests"] = tests

bench, ratios = {}, []
for prec in ("fp32", "bf16"):
    result = read(detail / f"bench_{prec}.json")
    if result is None:
        log = detail / f"bench_{prec}.log"
        bench[prec] = {"error": log.read_text()[-1500:] if log.is_file() else "not run"}
        continue
    loops = result["loops"]
    bench[prec] = {"ratio": result["ratio"], "paired_ratio_median": result["paired_ratio_median"],
                   "rescompress_images_per_s": loops["rescompress"]["images_per_s"],
                   "plain_images_per_s": loops["plain"]["images_per_s"],
                   "rescompress_setup_seconds": loops["rescompress"]["setup_seconds"],
                   "config": result["config"], "includes": {k: v["includes"] for k, v in loops.items()}}
    ratios.append(result["ratio"])
out["benchmark"] = bench
out["throughput_ok"] = len(ratios) == 2 and min(ratios) >= 0.9
out["tests_ok"] = test_rc == 0 and tests["passed"] > 0 and not tests["failed"] and not tests["errors"]
out["ok"] = out["tests_ok"] and out["throughput_ok"]
summary.write_text(json.dumps(out, indent=2))
print(json.dumps({k: out[k] for k in ("ok", "tests_ok", "throughput_ok", "seconds")}
                 | {"tests": {k: tests[k] for k in ("passed", "failed", "errors", "skipped")},
                    "ratios": {p: b.get("ratio") for p, b in bench.items()}}))
print(f"wrote {summary}")
sys.exit(0 if out["ok"] else 1)
PY
