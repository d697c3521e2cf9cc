"""GGUF LoRA adapters written with gguf's own GGUFWriter, as llama.cpp's convert_lora_to_gguf.py writes them.

The same key/value fields (general.architecture from the writer, general.type "adapter", adapter.type
"lora", adapter.lora.alpha as float32, general.name, general.file_type, general.quantization_version),
the same tensor names (``<gguf tensor>.lora_a`` / ``.lora_b``) and orientation: a PEFT A (r, in) and B
(out, r) are stored as they are (numpy order; ggml's ne is reversed), except the token embedding, whose
lora_a is stored transposed. Types as convert's ``--outtype``: f32, f16, bf16 and q8_0 (through
``gguf.quants.quantize``, falling back to F16 for a tensor whose rows are not whole Q8_0 blocks, as convert does).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def q8_0_reference(x: np.ndarray) -> np.ndarray:
    """What Q8_0 stores for ``x``, in float64, computed block by block the slow obvious way (ggml's rule: a block
    of 32 gets d = max|x| / 127, stored as float16; each value round(x / d), half away from zero)."""
    x = np.asarray(x, dtype=np.float32)
    out = np.zeros(x.shape, dtype=np.float64)
    for index in np.ndindex(x.shape[:-1]):
        row = x[index]
        for start in range(0, row.size, 32):
            block = row[start:start + 32]
            d = np.float32(np.abs(block).max()) / np.float32(127)
            q = np.zeros(32) if d == 0 else np.trunc(block / d + np.copysign(np.float32(0.5), block))
            out[index][start:start + 32] = float(np.float16(d)) * q
    return out


def stored(x: np.ndarray, outtype: str) -> np.ndarray:
    """The float64 values a tensor holds once written as ``outtype`` (independent of rankscope and of gguf)."""
    if outtype == "f32":
        return x.astype(np.float32).astype(np.float64)
    if outtype == "f16" or (outtype == "q8_0" and x.shape[-1] % 32):
        return x.astype(np.float32).astype(np.float16).astype(np.float64)  # as written: float32 first
    if outtype == "bf16":  # round to nearest even on the top 16 bits of the float32
        bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return q8_0_reference(x)


def _add(writer: gguf.GGUFWriter, name: str, x: np.ndarray, outtype: str) -> None:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if outtype == "f32":
        writer.add_tensor(name, x)
    elif outtype == "f16":
        writer.add_tensor(name, x.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
        try:
            writer.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        except gguf.QuantError:  # convert falls back to F16 where the rows are not whole blocks
            writer.add_tensor(name, x.astype(np.float16))


def write_gguf_lora(path: Path, arch: str, modules: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float,
                    outtype: str = "f32", general_type: str = "adapter", norms: dict[str, np.ndarray] | None = None
                    ) -> Path:
    """``modules``: GGUF tensor name (``blk.0.attn_q.weight``) -> PEFT (A (r, in), B (out, r))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(general_type)
    if general_type == "adapter":
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name("Test Adapter")
    writer.add_file_type(FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, (A, B) in modules.items():
        _add(writer, name + ".lora_a", A.T if name == "token_embd.weight" else A, outtype)
        _add(writer, name + ".lora_b", B, outtype)
    for name, vector in (norms or {}).items():
        writer.add_tensor(name, vector.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_modules(blocks: int = 2, r: int = 8, seed: int = 0, d: int = 64, ff: int = 96,
                  decay: float = 0.7) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """q, k, v, o, gate, up, down of ``blocks`` layers, rank r, unequal directions (decay**i, a different decay
    per module, so --energy gives different ranks)."""
    rng = np.random.default_rng(seed)
    shapes = {"attn_q": (d, d), "attn_k": (d, d), "attn_v": (d, d), "attn_output": (d, d), "ffn_gate": (d, ff),
              "ffn_up": (d, ff), "ffn_down": (ff, d)}
    modules = {}
    for block in range(blocks):
        for i, (kind, (n_in, n_out)) in enumerate(shapes.items()):
            weights = (decay + 0.04 * i) ** np.arange(r)
            modules[f"blk.{block}.{kind}.weight"] = (rng.normal(size=(r, n_in)) * weights[:, None],
                                                     rng.normal(size=(n_out, r)) / 4)
    return modules
