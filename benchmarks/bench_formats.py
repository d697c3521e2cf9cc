"""Does reading a format cost more than reading PEFT? ``rankscope analyze`` of one adapter in three formats.

The adapter: LLaMA-2-7B-shaped, r=64 on all seven projections of its layers (q/k/v/o 4096→4096,
gate/up 4096→11008, down 11008→4096), float16, random A and B with unequal ranks, lora_alpha 128,
written three ways with the same values:

  peft   adapter_model.safetensors + adapter_config.json (the baseline)
  gguf   lora.gguf as llama.cpp's convert_lora_to_gguf.py writes it (gguf's GGUFWriter, --outtype f16:
         general.type adapter, adapter.lora.alpha, blk.N.attn_q.weight.lora_a / .lora_b)
  kohya  lora.safetensors with lora_te_model_layers_N_…lora_down / lora_up / alpha

Each is generated once into benchmarks/.cache/ (written aside and renamed). Each measurement is one fresh
child process ``rankscope analyze PATH --json FILE --no-progress``, run one at a time, the formats in
alternating order; wall time from spawn to exit, peak RSS from ``os.wait4`` for that child alone. One
untimed pass warms the page cache first. Reported: the median of ``--repeats`` per format, its ratio to
PEFT's (the ratio of medians, and the median of each round's ratio, the goal's measure: ≤ 1.2)
and its peak RSS over its file's size (goal < 0.5).

    .venv/bin/python benchmarks/bench_formats.py [--repeats 3] [--layers 32]

``--layers N`` builds a smaller adapter of the same layer shapes (the default, 32, is LLaMA-2-7B's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_analyze import measure  # one process alone: wall time and its own peak RSS

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / ".cache"
RANK, ALPHA, HIDDEN, INTERMEDIATE = 64, 128, 4096, 11008
PROJECTIONS = {  # HF name -> (where, GGUF name, in_features, out_features)
    "q_proj": ("self_attn", "attn_q", HIDDEN, HIDDEN),
    "k_proj": ("self_attn", "attn_k", HIDDEN, HIDDEN),
    "v_proj": ("self_attn", "attn_v", HIDDEN, HIDDEN),
    "o_proj": ("self_attn", "attn_output", HIDDEN, HIDDEN),
    "gate_proj": ("mlp", "ffn_gate", HIDDEN, INTERMEDIATE),
    "up_proj": ("mlp", "ffn_up", HIDDEN, INTERMEDIATE),
    "down_proj": ("mlp", "ffn_down", INTERMEDIATE, HIDDEN),
}
FORMATS = ("peft", "gguf", "kohya")


def modules(layers: int):
    """(layer, HF projection, where, GGUF name, A (r, in) f16, B (out, r) f16), one module at a time."""
    rng = np.random.default_rng(0)
    for i in range(layers):
        for proj, (where, gguf_name, fan_in, fan_out) in PROJECTIONS.items():
            sizes = np.exp(rng.standard_normal(RANK, dtype=np.float32))  # unequal ranks
            A = (rng.standard_normal((RANK, fan_in), dtype=np.float32) / fan_in ** 0.5).astype(np.float16)
            B = (rng.standard_normal((fan_out, RANK), dtype=np.float32) * 0.01 * sizes).astype(np.float16)
            yield i, proj, where, gguf_name, A, B


def build(layers: int) -> dict[str, Path]:
    """The three files (generated once each); returns the path each is analysed by."""
    root = CACHE / f"formats-llama2-7b-shape-r{RANK}-f16-{layers}layers-v1"
    paths = {"peft": root / "peft", "gguf": root / "gguf" / "lora.gguf", "kohya": root / "kohya" / "lora.safetensors"}
    if not (paths["peft"] / "adapter_model.safetensors").is_file():
        from safetensors.numpy import save_file

        print(f"generating the PEFT adapter ({layers} layers, once) ...", file=sys.stderr, flush=True)
        state = {}
        for i, proj, where, _, A, B in modules(layers):
            key = f"base_model.model.model.layers.{i}.{where}.{proj}"
            state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = A, B
        paths["peft"].mkdir(parents=True, exist_ok=True)
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA,
                  "target_modules": list(PROJECTIONS), "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}
        (paths["peft"] / "adapter_config.json").write_text(json.dumps(config, indent=2))
        _replace(paths["peft"] / "adapter_model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    if not paths["gguf"].is_file():
        import gguf

        print("generating the GGUF adapter (once) ...", file=sys.stderr, flush=True)

        def write_gguf(tmp: Path) -> None:
            writer = gguf.GGUFWriter(tmp, "llama")
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(ALPHA))
            writer.add_name("Llama 2 7b Hf LoRA benchmark")
            writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for i, _, _, gguf_name, A, B in modules(layers):
                writer.add_tensor(f"blk.{i}.{gguf_name}.weight.lora_a", A)
                writer.add_tensor(f"blk.{i}.{gguf_name}.weight.lora_b", B)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()

        paths["gguf"].parent.mkdir(parents=True, exist_ok=True)
        _replace(paths["gguf"], write_gguf)
    if not paths["kohya"].is_file():
        from safetensors.numpy import save_file

        print("generating the kohya adapter (once) ...", file=sys.stderr, flush=True)
        state = {}
        for i, proj, where, _, A, B in modules(layers):
            key = f"lora_te_model_layers_{i}_{where}_{proj}"
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = A, B
            state[f"{key}.alpha"] = np.array(ALPHA, dtype=np.float16)
        paths["kohya"].parent.mkdir(parents=True, exist_ok=True)
        metadata = {"ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA), "ss_network_module": "networks.lora"}
        _replace(paths["kohya"], lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return paths


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each format (median reported)")
    parser.add_argument("--layers", type=int, default=32, help="layers of the adapter (32: LLaMA-2-7B)")

    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate_only:
        build(args.layers)
        return
    # Generated in a child: a child's peak RSS from os.wait4 starts at its parent's size when forked.
    subprocess.run([sys.executable, __file__, "--generate-only", "--layers", str(args.layers)], check=True)
    paths = build(args.layers)
    weights = {"peft": paths["peft"] / "adapter_model.safetensors", "gguf": paths["gguf"], "kohya": paths["kohya"]}
    sizes = {fmt: weights[fmt].stat().st_size for fmt in FORMATS}
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="bench_formats_") as scratch:
        scratch = Path(scratch)
        commands = {fmt: [python, "-m", "rankscope.cli", "analyze", str(paths[fmt]), "--json",
                          str(scratch / f"{fmt}.json"), "--no-progress"] for fmt in FORMATS}
        results: dict[str, list[dict]] = {fmt: [] for fmt in FORMATS}
        for fmt in FORMATS:  # untimed: warms the page cache and bytecode caches
            measure(commands[fmt], scratch / f"{fmt}.out")
        for repeat in range(args.repeats):
            for fmt in (FORMATS if repeat % 2 == 0 else FORMATS[::-1]):
                result = measure(commands[fmt], scratch / f"{fmt}.out")
                results[fmt].append(result)
                print(f"  {repeat + 1}/{args.repeats} {fmt:6s} {result['wall']:7.2f} s  {result['rss'] / 2**20:6.0f} MiB",
                      file=sys.stderr, flush=True)
        documents = {fmt: json.loads((scratch / f"{fmt}.json").read_text())["snapshots"][0] for fmt in FORMATS}
    n = args.layers * len(PROJECTIONS)
    for fmt, snapshot in documents.items():  # the same adapter read three ways: the same numbers
        assert snapshot["format"] == fmt and len(snapshot["modules"]) == n and not snapshot["summary"]["errors"], fmt
        assert {m["scale"] for m in snapshot["modules"]} == {ALPHA / RANK}, fmt
    def by_module(fmt: str) -> dict[tuple[str, str], list[float]]:
        return {re.search(r"(\d+)[._](?:self_attn|mlp)[._](\w+_proj)$", m["name"]).groups(): m["spectrum"]
                for m in documents[fmt]["modules"]}

    for fmt in ("gguf", "kohya"):
        theirs = by_module("peft")
        for key, spectrum in by_module(fmt).items():
            np.testing.assert_allclose(spectrum, theirs[key], rtol=1e-9)

    wall = {fmt: statistics.median(r["wall"] for r in results[fmt]) for fmt in FORMATS}
    # The ratio within each round (formats measured back to back), then its median: steadier on a busy machine.
    paired = {fmt: statistics.median(r["wall"] / p["wall"] for r, p in zip(results[fmt], results["peft"]))
              for fmt in FORMATS}
    rss = {fmt: statistics.median(r["rss"] for r in results[fmt]) for fmt in FORMATS}
    print(f"rankscope analyze, {args.layers} layers × 7 projections, r={RANK}, float16 ({n} modules); "
          f"median of {args.repeats}, {os.cpu_count()} CPUs")
    print(f"{'format':8s} {'file MiB':>9s} {'wall s':>8s} {'vs peft':>8s} {'per round':>10s} {'peak RSS MiB':>13s} "
          f"{'RSS / file':>11s}")
    for fmt in FORMATS:
        print(f"{fmt:8s} {sizes[fmt] / 2**20:9.0f} {wall[fmt]:8.2f} {wall[fmt] / wall['peft']:7.2f}× {paired[fmt]:9.2f}× "
              f"{rss[fmt] / 2**20:13.0f} {rss[fmt] / sizes[fmt]:10.2f}×")
    for fmt in ("gguf", "kohya"):
        ok_time, ok_rss = paired[fmt] <= 1.2, rss[fmt] / sizes[fmt] < 0.5
        print(f"goal {fmt}: time ≤ 1.2× peft: {'met' if ok_time else 'NOT met'}; peak RSS < 0.5× file: "
              f"{'met' if ok_rss else 'NOT met'}")


if __name__ == "__main__":
    main()
