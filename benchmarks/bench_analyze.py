"""How fast and how lean is ``rankscope analyze`` on a LLaMA-2-7B sized adapter?

The adapter: a synthetic PEFT LoRA shaped like LLaMA-2-7B at r=64 on all seven projections of
its 32 layers (q/k/v/o 4096→4096, gate/up 4096→11008, down 11008→4096), bf16, random non-zero
A and B with unequal ranks, plus adapter_config.json (lora_alpha 128): 224 modules, ~320 MB.
It is generated once into benchmarks/.cache/ (written atomically) with a run folder of ten
snapshots checkpoint-100 … checkpoint-1000 that hard-link the same weights.

Each measurement is one fresh child process, run one at a time; its wall time is from spawn to
exit (interpreter start and imports included) and its peak RSS comes from ``os.wait4`` for that
child alone. Compared, alternating order, median of ``--repeats``:

  (a) analyze   ``rankscope analyze DIR --json FILE --no-progress`` (``rankscope.cli.main`` in a
                ``python -c`` child that also reports whether torch/transformers/peft got imported)
  (b) baseline  ``import torch; from safetensors.torch import load_file; load_file(path)``
  (c) run       ``rankscope analyze RUN_DIR ...`` over the ten snapshots
  (d) torch     ``import torch`` alone, to show how much of (b) is the import
  (e) resize    ``rankscope resize DIR --out OUT --energy 0.95 --overwrite`` (goal: ≤ 2× (a), peak RSS < 1× the file)

    .venv/bin/python benchmarks/bench_analyze.py [--repeats 3]

Nothing is written outside benchmarks/.cache/ (the JSON outputs go to a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / ".cache"
NAME = "llama2-7b-r64-bf16-v1"
ADAPTER_DIR = CACHE / NAME
RUN_DIR = CACHE / f"{NAME}-run"
WEIGHTS = "adapter_model.safetensors"
STEPS = list(range(100, 1001, 100))

LAYERS, RANK, ALPHA, HIDDEN, INTERMEDIATE = 32, 64, 128, 4096, 11008
PROJECTIONS = {  # name -> (where, in_features, out_features)
    "q_proj": ("self_attn", HIDDEN, HIDDEN),
    "k_proj": ("self_attn", HIDDEN, HIDDEN),
    "v_proj": ("self_attn", HIDDEN, HIDDEN),
    "o_proj": ("self_attn", HIDDEN, HIDDEN),
    "gate_proj": ("mlp", HIDDEN, INTERMEDIATE),
    "up_proj": ("mlp", HIDDEN, INTERMEDIATE),
    "down_proj": ("mlp", INTERMEDIATE, HIDDEN),
}
HEAVY = ("torch", "transformers", "peft", "matplotlib", "scipy")


# --------------------------------------------------------------------------- the cached adapter


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _config() -> bytes:
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
        "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.05, "bias": "none", "use_rslora": False,
        "target_modules": list(PROJECTIONS),
    }
    return (json.dumps(config, indent=2) + "\n").encode()


def build_adapter() -> Path:
    """The single adapter folder (generated once), then the run folder of hard links to it."""
    weights = ADAPTER_DIR / WEIGHTS
    if not weights.is_file():
        import torch
        from safetensors.torch import save_file

        print(f"generating {weights} (once) ...", file=sys.stderr, flush=True)
        ADAPTER_DIR.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        state = {}
        for i in range(LAYERS):
            for proj, (where, fan_in, fan_out) in PROJECTIONS.items():
                key = f"base_model.model.model.layers.{i}.{where}.{proj}"
                # Unequal ranks: each rank's column of B gets its own log-normal size.
                rank_sizes = torch.exp(torch.randn(RANK, generator=g))
                A = torch.randn(RANK, fan_in, generator=g) / fan_in ** 0.5
                B = torch.randn(fan_out, RANK, generator=g) * 0.01 * rank_sizes
                state[f"{key}.lora_A.weight"] = A.to(torch.bfloat16)
                state[f"{key}.lora_B.weight"] = B.to(torch.bfloat16)
        tmp = weights.with_name(f".{WEIGHTS}.tmp{os.getpid()}")
        save_file(state, str(tmp), metadata={"format": "pt"})
        del state
        os.replace(tmp, weights)
    if not (ADAPTER_DIR / "adapter_config.json").is_file():
        _write_atomic(ADAPTER_DIR / "adapter_config.json", _config())
    for step in STEPS:
        folder = RUN_DIR / f"checkpoint-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "adapter_config.json").is_file():
            _write_atomic(folder / "adapter_config.json", _config())
        if not (folder / WEIGHTS).is_file():
            tmp = folder / f".{WEIGHTS}.tmp{os.getpid()}"
            try:
                os.link(weights, tmp)  # same bytes, no extra disk
            except OSError:
                tmp.symlink_to(weights)
            os.replace(tmp, folder / WEIGHTS)
    return weights


# --------------------------------------------------------------------------- one child at a time

_ANALYZE_CHILD = r"""
import atexit, json, sys
def _report():
    sys.stdout.flush()
    print("BENCH_MODULES " + json.dumps({m: m in sys.modules for m in %r}), flush=True)
atexit.register(_report)
from rankscope.cli import main
main(sys.argv[1:])
""" % (HEAVY,)

_BASELINE_CHILD = r"""
import sys
import torch
from safetensors.torch import load_file
state = load_file(sys.argv[1])
assert len(state) == %d
""" % (2 * LAYERS * len(PROJECTIONS),)


def measure(argv: list[str], stdout_path: Path) -> dict:
    """Run ``argv`` alone; wall seconds from spawn to exit and that child's own peak RSS (bytes)."""
    with open(stdout_path, "wb") as out:
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    text = stdout_path.read_text(errors="replace")
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... exited with {child.returncode}:\n{text[-2000:]}")
    return {"wall": wall, "rss": usage.ru_maxrss * 1024, "stdout": text}  # ru_maxrss is KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each kind (median reported)")
    args = parser.parse_args()

    weights = build_adapter()
    size = weights.stat().st_size
    python = sys.executable
    env_note = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs"

    with tempfile.TemporaryDirectory(prefix="bench_analyze_") as scratch:
        scratch = Path(scratch)
        commands = {
            "analyze": [python, "-c", _ANALYZE_CHILD, "analyze", str(ADAPTER_DIR), "--json",
                        str(scratch / "single.json"), "--no-progress"],
            "baseline": [python, "-c", _BASELINE_CHILD, str(weights)],
            "run": [python, "-c", _ANALYZE_CHILD, "analyze", str(RUN_DIR), "--json",
                    str(scratch / "run.json"), "--no-progress"],
            "torch": [python, "-c", "import torch"],  # context: how much of (b) is the import
            "resize": [python, "-c", _ANALYZE_CHILD, "resize", str(ADAPTER_DIR), "--out", str(scratch / "resized"),
                       "--energy", "0.95", "--overwrite"],
        }
        results: dict[str, list[dict]] = {kind: [] for kind in commands}
        # One untimed pass of each warms the page cache and the bytecode caches for everyone.
        for kind, argv in commands.items():
            measure(argv, scratch / f"{kind}.out")
        for repeat in range(args.repeats):
            order = list(commands) if repeat % 2 == 0 else list(reversed(commands))
            for kind in order:
                result = measure(commands[kind], scratch / f"{kind}.out")
                results[kind].append(result)
                print(f"  {repeat + 1}/{args.repeats} {kind:8s} {result['wall']:7.2f} s  "
                      f"{result['rss'] / 2**20:7.0f} MiB", file=sys.stderr, flush=True)

        single = json.loads((scratch / "single.json").read_text())
        run = json.loads((scratch / "run.json").read_text())

    def imported_by(kind: str) -> dict[str, bool]:
        line = next(x for x in results[kind][-1]["stdout"].splitlines() if x.startswith("BENCH_MODULES "))
        return json.loads(line.removeprefix("BENCH_MODULES "))

    n_modules = len(single["snapshots"][0]["modules"])
    errors = sum(len(s["summary"]["errors"]) for s in single["snapshots"] + run["snapshots"])
    assert n_modules == LAYERS * len(PROJECTIONS) and len(run["snapshots"]) == len(STEPS) and errors == 0

    def med(kind: str, what: str) -> float:
        return statistics.median(r[what] for r in results[kind])

    mib = 2**20
    t_a, t_b, t_run, t_t, t_r = (med(kind, "wall") for kind in ("analyze", "baseline", "run", "torch", "resize"))
    m_a, m_b, m_run, m_t, m_r = (med(kind, "rss") for kind in ("analyze", "baseline", "run", "torch", "resize"))
    print()
    print(f"adapter: {n_modules} modules, r={RANK}, bf16, {size / mib:.0f} MiB ({size / 1e6:.0f} MB); "
          f"median of {args.repeats}, fresh process each, {env_note}")
    print()
    print(f"| {'measurement':36s} | {'wall s':>7s} | {'peak RSS MiB':>12s} |")
    print(f"|{'-' * 38}|{'-' * 9}|{'-' * 14}|")
    print(f"| {'(a) rankscope analyze, 1 snapshot':36s} | {t_a:7.2f} | {m_a / mib:12.0f} |")
    print(f"| {'(b) torch + safetensors load_file':36s} | {t_b:7.2f} | {m_b / mib:12.0f} |")
    print(f"| {'(c) rankscope analyze, 10 snapshots':36s} | {t_run:7.2f} | {m_run / mib:12.0f} |")
    print(f"| {'(d) import torch alone (context)':36s} | {t_t:7.2f} | {m_t / mib:12.0f} |")
    print(f"| {'(e) rankscope resize --energy 0.95':36s} | {t_r:7.2f} | {m_r / mib:12.0f} |")
    print()
    print(f"| {'ratio':38s} | {'value':>6s} | {'goal':>6s} |")
    print(f"|{'-' * 40}|{'-' * 8}|{'-' * 8}|")
    print(f"| {'time (a)/(b)':38s} | {t_a / t_b:6.2f} | {'<= 1':>6s} |")
    print(f"| {'peak RSS (a) / file size':38s} | {m_a / size:6.2f} | {'< 2':>6s} |")
    print(f"| {'peak RSS (b) / file size':38s} | {m_b / size:6.2f} | {'':>6s} |")
    print(f"| {'peak RSS (a)/(b)':38s} | {m_a / m_b:6.2f} | {'':>6s} |")
    print(f"| {'peak RSS (c) / (a)':38s} | {m_run / m_a:6.2f} | {'~ 1':>6s} |")
    print(f"| {'time per snapshot (c)/10, seconds':38s} | {t_run / len(STEPS):6.2f} | {'':>6s} |")
    print(f"| {'time (e)/(a): resize over analyze':38s} | {t_r / t_a:6.2f} | {'<= 2':>6s} |")
    print(f"| {'peak RSS (e) / file size':38s} | {m_r / size:6.2f} | {'< 1':>6s} |")
    print()
    for kind, label in (("analyze", "(a)"), ("run", "(c)")):
        print(f"imported by {label} at exit: " + ", ".join(f"{m}={'yes' if v else 'no'}" for m, v in imported_by(kind).items()))


if __name__ == "__main__":
    main()
