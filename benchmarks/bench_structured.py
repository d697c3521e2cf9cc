"""LoHa and LoKr against LoRA: ``analyze`` and ``resize`` time on adapters of the same shape and rank.

Three PEFT adapters on the same modules (``--layers`` layers × q/k/v/o, 4096→4096, bf16, r = ``--rank``, random
non-zero factors), as PEFT's LoraConfig / LoHaConfig / LoKrConfig store them:

  lora  lora_A (r, 4096), lora_B (4096, r)                                    ΔW rank ≤ r
  loha  hada_w1_a / hada_w2_a (4096, r), hada_w1_b / hada_w2_b (r, 4096)       ΔW rank ≤ r²
  lokr  lokr_w1 (64, 64), lokr_w2_a (64, r), lokr_w2_b (r, 64) (PEFT's default factor)   ΔW rank ≤ 64·r
  lora at r² as well: the LoRA whose ΔW can have LoHa's rank (its spectrum costs the same kind of r²×r² work)

Each is analysed (``rankscope.analyze``, spectra included) and resized to a LoRA of rank r (``rankscope.resize``,
``--rank r``: the same output size for all three), in this process, alternating order, median of ``--repeats``.
Goal (issue #19): LoHa and LoKr each ≤ 3× their LoRA counterpart in both.

    .venv/bin/python benchmarks/bench_structured.py [--layers 8] [--rank 8] [--repeats 3]

The adapters go to benchmarks/.cache/ (regenerated on each run), the resized ones to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rankscope import analyze  # noqa: E402
from rankscope.adapters.resize import resize  # noqa: E402
from rankscope.io.tensors import encode_safetensors, encode_tensor  # noqa: E402

CACHE = REPO / "benchmarks" / ".cache"
HIDDEN, FACTOR = 4096, 64
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _tensor(rng: np.random.Generator, *shape: int) -> tuple[str, tuple[int, ...], bytes]:
    return "BF16", shape, encode_tensor(rng.standard_normal(shape) / np.sqrt(shape[-1]), "BF16")


def write_adapters(layers: int, r: int) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    folders = {}
    for method in ("lora", "loha", "lokr", "lora-r2"):
        tensors = {}
        for i in range(layers):
            for proj in PROJECTIONS:
                name = f"base_model.model.model.layers.{i}.self_attn.{proj}"
                if method.startswith("lora"):
                    rank = r * r if method == "lora-r2" else r
                    tensors[f"{name}.lora_A.weight"] = _tensor(rng, rank, HIDDEN)
                    tensors[f"{name}.lora_B.weight"] = _tensor(rng, HIDDEN, rank)
                elif method == "loha":
                    for half in ("1", "2"):
                        tensors[f"{name}.hada_w{half}_a"] = _tensor(rng, HIDDEN, r)
                        tensors[f"{name}.hada_w{half}_b"] = _tensor(rng, r, HIDDEN)
                else:
                    tensors[f"{name}.lokr_w1"] = _tensor(rng, FACTOR, FACTOR)
                    tensors[f"{name}.lokr_w2_a"] = _tensor(rng, HIDDEN // FACTOR, r)
                    tensors[f"{name}.lokr_w2_b"] = _tensor(rng, r, HIDDEN // FACTOR)
        folder = CACHE / f"structured-{method}-l{layers}-r{r}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_model.safetensors").write_bytes(b"".join(encode_safetensors(tensors, {})))
        lora = method.startswith("lora")
        rank = r * r if method == "lora-r2" else r
        config = {"peft_type": "LORA" if lora else method.upper(), "r": rank, "lora_alpha" if lora else "alpha": 2 * rank,
                  "target_modules": list(PROJECTIONS)}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        folders[method] = folder
    return folders


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folders = write_adapters(args.layers, args.rank)
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = ["lora", "loha", "lokr", "lora-r2"]
            order = order if repeat % 2 == 0 else order[::-1]
            for method in order:
                folder = folders[method]
                times.setdefault((method, "analyze"), []).append(timed(lambda: analyze(folder, progress=False)))
                out = Path(tmp) / f"{method}-{repeat}"
                times.setdefault((method, "resize"), []).append(
                    timed(lambda: resize(folder, out, rank=args.rank)))
    modules = args.layers * len(PROJECTIONS)
    print(f"{modules} modules {HIDDEN}×{HIDDEN}, r = {args.rank}, bf16; median of {args.repeats} "
          "(seconds, in-process)")
    for step in ("analyze", "resize"):
        base = statistics.median(times[("lora", step)])
        line = f"  {step:<8} lora {base:.3f}"
        for method in ("loha", "lokr"):
            value = statistics.median(times[(method, step)])
            line += f"   {method} {value:.3f} ({value / base:.2f}×)"
        square = statistics.median(times[("lora-r2", step)])
        loha = statistics.median(times[("loha", step)])
        print(line + f"   | lora r={args.rank ** 2} {square:.3f} (loha {loha / square:.2f}× of it)")


if __name__ == "__main__":
    main()
