"""Peak memory of `rescompress run` on image folders of growing size: streaming must keep it flat.

For each folder size (default 6,000 and 24,000 images of 256x256 JPEGs in 10 classes, written once under
--work), this runs, each in a fresh process under /usr/bin/time -v:
  1. `rescompress run R --dry-run` (scan, split, statistics sample, plan);
  2. a 1-epoch ResNet-18 run at 224x224 with `data.limit_train: 512`, evaluated on the full val and test
     splits (torch baseline, then torch and ONNX artifacts in their runtimes).
It records the main process's peak RSS (time -v) and the peak of the whole process tree's summed PSS
(main process plus loader workers, shared pages counted once), sampled every 0.2 s, then writes JSON.

    python tools/bench_stream_memory.py --out bench/stream_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """name: stream-memory
seed: 0
model: {{name: resnet18}}
data: {{name: image_folder, root: {root}, image_size: 224, channels: 3, workers: 2, limit_train: 512,
        val_fraction: 0.1, test_fraction: 0.2}}
train: {{epochs: 1, batch_size: 32, eval_batch_size: 128, lr: 0.01, threads: 2}}
export:
  - onnx: {{precision: fp32}}
devices: [host-cpu]
report: {{latency: {{batch: 1, warmup: 2, runs: 10}}}}
"""


def write_folder(root: Path, n: int, classes: int = 10, size: int = 256) -> None:
    """Smooth 256x256 JPEGs (about 8-10 kB each), `n` in all, written once."""
    import numpy as np
    from PIL import Image

    if root.is_dir() and sum(1 for _ in root.rglob("*.jpg")) == n:
        return
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c = i % classes
        d = root / f"class{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        phase = rng.uniform(0, 6, 2)
        base = np.stack([np.sin(xx * (c + 1) * 3 + phase[0]), np.cos(yy * (c + 2) * 2 + phase[1]),
                         np.sin((xx + yy) * (c + 1))], -1)
        Image.fromarray(((base * 0.5 + 0.5) * 255).astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=85)


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _pss(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else 0


def measure(cmd: list[str], log: Path) -> dict:
    t0 = time.time()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            cwd=ROOT)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], sum(_pss(p) for p in _tree(proc.pid)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = proc.wait()
    stop.set()
    sampler.join()
    text = log.read_text()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"exit_code": rc, "seconds": round(time.time() - t0, 1),
            "peak_rss_main_bytes": int(rss.group(1)) * 1024 if rss else None,
            "peak_pss_tree_bytes": peak[0], "log": str(log)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="6000,24000")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "rescompress-stream-memory")
    ap.add_argument("--skip-run", action="store_true", help="only the dry runs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "stream_memory.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "rescompress"]
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        folder = args.work / f"images{n}"
        write_folder(folder, n)
        recipe = args.work / f"recipe{n}.yaml"
        recipe.write_text(RECIPE.format(root=folder))
        row: dict = {"images": n, "jpeg_bytes": sum(p.stat().st_size for p in folder.rglob("*.jpg"))}
        row["dry_run"] = measure([*exe, "run", str(recipe), "--dry-run"], args.work / f"dry{n}.log")
        if not args.skip_run:
            out = args.work / f"runs{n}"
            row["run_1_epoch"] = measure([*exe, "run", str(recipe), "--out", str(out)], args.work / f"run{n}.log")
        results.append(row)
        print(json.dumps(row, indent=1), flush=True)
    doc = {"what": "peak memory of rescompress run on image folders (256x256 JPEGs, 224x224 input, ResNet-18, "
                   "2 loader workers)", "recipe": RECIPE, "results": results}
    if len(results) >= 2:
        a, b = results[0], results[-1]
        doc["ratios"] = {f"{k}_{m}": round(b[k][m] / a[k][m], 3)
                         for k in ("dry_run", "run_1_epoch") if k in a
                         for m in ("peak_rss_main_bytes", "peak_pss_tree_bytes") if a[k][m]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
