"""How long and how much memory does ``rankscope analyze`` take on a long rank trace?

The trace: ``rank_trace.jsonl`` of N records (default 10,000 and 100,000), 12 modules of rank 16 each
(importances and spectra at 8 significant digits, as the monitor writes them), generated once into
benchmarks/.cache/trace-N/ (by a child process, so this process stays small: a child's peak RSS is
then its own). Each measurement is a fresh child, ``rankscope analyze DIR --json FILE --no-progress``,
once with the default even subsample and once with ``--all-records`` (only up to 10,000 records: every
record is held in the document). Reported: wall time, peak RSS (``os.wait4``), the records analysed.

    .venv/bin/python benchmarks/bench_trace.py [--records 10000 100000] [--repeats 1]

Goal (#22): 100,000 records of 12 modules in at most 60 s, peak RSS under 500 MB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / ".cache"
MODULES, RANK = 12, 16

GENERATE = """
import os, sys, numpy as np
from rankscope.io.trace import module_text, record_text
path, n, modules, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
tmp = path + ".tmp"
with open(tmp, "w") as f:
    for step in range(1, n + 1):
        texts = []
        for m in range(modules):
            importance = np.abs(rng.normal(size=rank)) + 0.1
            spectrum = np.sort(np.abs(rng.normal(size=rank)))[::-1]
            meta = {"name": f"base_model.model.layers.{m // 2}.{'qv'[m % 2]}_proj", "rank": rank, "scale": 2.0,
                    "shape": [64, 64], "layer_type": "linear", "dtype": "F32"}
            texts.append(module_text(meta, {"importance": importance, "spectrum": spectrum}))
        f.write(record_text(step, texts, time=1.0) + "\\n")
os.replace(tmp, path)
"""


def trace_dir(records: int) -> Path:
    folder = CACHE / f"trace-{records}x{MODULES}r{RANK}-v1"
    path = folder / "rank_trace.jsonl"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        print(f"generating {path} (once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-c", GENERATE, str(path), str(records), str(MODULES), str(RANK)],
                       check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return folder


def measure(folder: Path, all_records: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "analysis.json"
        command = [sys.executable, "-m", "rankscope.cli", "analyze", str(folder), "--json", str(out), "--no-progress"]
        start = time.perf_counter()
        child = subprocess.Popen(command + (["--all-records"] if all_records else []), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        err = child.stderr.read().decode()
        if status != 0:
            raise SystemExit(f"analyze failed: {err}")
        # Counted in a child: this process stays small, so the next child's peak RSS is its own (a forked
        # child's high-water mark starts at its parent's resident size).
        count = subprocess.run([sys.executable, "-c", "import json, sys; print(len(json.load(open(sys.argv[1]))"
                                "['snapshots']))", str(out)], capture_output=True, text=True, check=True)
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "analysed": int(count.stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for records in args.records:
        folder = trace_dir(records)
        size = (folder / "rank_trace.jsonl").stat().st_size / 2**20
        for all_records in ([False, True] if records <= 10_000 else [False]):
            runs = [measure(folder, all_records) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["seconds"])
            rows.append((records, size, "every record" if all_records else "default", best))
            print(f"{records:>7} records ({size:.0f} MiB)  {rows[-1][2]:<13} {best['seconds']:6.1f} s  "
                  f"{best['peak_rss_mb']:6.0f} MB peak RSS  {best['analysed']} analysed", file=sys.stderr)
    print("| records | trace file | mode | wall | peak RSS | records analysed |")
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for records, size, mode, best in rows:
        print(f"| {records:,} | {size:.0f} MiB | {mode} | {best['seconds']:.1f} s | {best['peak_rss_mb']:.0f} MB | "
              f"{best['analysed']:,} |")


if __name__ == "__main__":
    main()
