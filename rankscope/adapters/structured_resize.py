"""``rankscope resize`` of LoHa / LoKr adapters: each module's exact best rank-k LoRA (Eckart–Young through its
structure, :func:`rankscope.maths.structured.truncated_factors`), written as a LoRA adapter.

PEFT LoHa / LoKr (``peft-loha``, ``peft-lokr``) become a PEFT LoRA adapter: ``<module>.lora_A.weight`` (k, in) and
``<module>.lora_B.weight`` (out, k) (conv: (k, in, kh, kw) and (out, k, 1, 1)), and adapter_config.json rewritten as
a LoraConfig (peft_type LORA, r, lora_alpha, rank_pattern, alpha_pattern keeping each module's trained scale,
target_modules and the base model from the source). LyCORIS / kohya files (``lycoris``) become a kohya LoRA file:
``<module>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` (scale · k), with the kohya metadata
(ss_network_module, ss_network_dim, ss_network_alpha, ss_network_args) rewritten to describe a LoRA.

The scale stays as trained: the new factors hold the unscaled truncation, the config or alpha gives the scale.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import numpy as np

from rankscope.errors import RankscopeError
from rankscope.io.formats import LoraModule
from rankscope.io.loading import Checkpoint
from rankscope.io.tensors import encode_tensor, open_tensor_file
from rankscope.maths import importance as imp
from rankscope.maths import structured
from rankscope.maths.suggest import module_rank, peft_fragment

# LoraConfig fields carried over from a LoHaConfig / LoKrConfig: what is adapted and on which base model.
_CARRIED = ("base_model_name_or_path", "revision", "task_type", "target_modules", "exclude_modules",
            "layers_to_transform", "layers_pattern", "modules_to_save", "inference_mode", "auto_mapping")
_LARGEST = {"F64": float(np.finfo(np.float64).max), "F32": float(np.finfo(np.float32).max),
            "F16": float(np.finfo(np.float16).max), "BF16": 3.3895313892515355e38}


def is_structured(checkpoint: Checkpoint) -> bool:
    """Whether ``checkpoint`` holds LoHa / LoKr modules (resized into LoRA here, not by the LoRA path)."""
    return any(m.method != "lora" for m in checkpoint.modules)


def new_factors(module: LoraModule, rule: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int, float, bool]:
    """(A' (k, in), B' (out, k), k, relative error, zero update) of one LoHa / LoKr module under ``rule``."""
    if module.dora:
        raise RankscopeError(f"{module.name} has a dora_scale: its applied update rescales W0 + ΔW by a learned "
                             "magnitude, so truncating ΔW is not the best approximation of what the layer applies; "
                             "rankscope resize does not resize weight-decomposed adapters")
    parts = module.parts
    if not all(np.isfinite(x).all() for x in parts.values()) or not math.isfinite(module.scale):
        raise RankscopeError(f"{module.name} holds NaN or Inf in its {module.method} factors or scale: it has no best "
                             "rank-k approximation; expected finite weights")
    def keep(sigma: np.ndarray) -> int:  # the rule picks k from σ; only the k kept directions are then built
        return module_rank(sigma, module.rank, energy=rule["energy"], fixed=rule["rank"], max_error=rule["max_error"],
                           module_min=rule["module_min"])

    with np.errstate(over="ignore", invalid="ignore"):
        A_full, B_full, sigma = structured.truncated_factors(module.method, parts, keep)
        overflow = not np.isfinite(module.scale * sigma).all()
    if overflow or not (np.isfinite(A_full).all() and np.isfinite(B_full).all()):
        raise RankscopeError(f"the update of {module.name} overflows float64: it has no finite best rank-k "
                             "approximation; expected factors whose product with the scale is finite")
    k = keep(sigma)
    if A_full.shape[0] == k:  # as many directions as kept (else the rest are zero slots)
        return A_full, B_full, k, imp.truncation_error(sigma, k), not sigma.any()
    A_new, B_new = np.zeros((k, module.in_features)), np.zeros((module.out_features, k))
    n = min(k, A_full.shape[0])
    A_new[:n], B_new[:, :n] = A_full[:n], B_full[:, :n]
    return A_new, B_new, k, imp.truncation_error(sigma, k), not sigma.any()


def _conv_shapes(module: LoraModule, k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A shape, B shape) as a LoRA conv layer stores them, or the 2-D ones where the kernel is not known."""
    kernel = (module.structure or {}).get("kernel")
    if not kernel:
        return (k, module.in_features), (module.out_features, k)
    size = int(np.prod(kernel))
    return (k, module.in_features // size, *kernel), (module.out_features, k, *[1] * len(kernel))


def _encoded(name: str, array: np.ndarray, kind: str) -> tuple[str, tuple[int, ...], bytes]:
    largest = float(np.abs(array).max()) if array.size else 0.0
    if largest > _LARGEST[kind]:
        raise RankscopeError(f"{name} reaches {largest:.4g}, beyond the largest {kind} number ({_LARGEST[kind]:.4g}), "
                             f"so writing {kind} would store Inf: expected --dtype fp32 (or bf16) for this adapter")
    return kind, array.shape, encode_tensor(array, kind)


def structured_entries(checkpoint: Checkpoint, rule: dict[str, Any], dtype: str | None, factors) -> tuple[
        dict[str, tuple[str, tuple[int, ...], bytes]], list[dict[str, Any]], dict[str, int], list[str]]:
    """Every tensor of the LoRA file written for a LoHa / LoKr checkpoint; ``factors`` yields :func:`new_factors` of
    each module in order. Returns (tensors, rows for ResizedModule, ranks, notes)."""
    tf = open_tensor_file(checkpoint.path)
    kohya = checkpoint.format == "lycoris"
    out: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    rows, ranks, flat = [], {}, []
    try:
        for module, (A_new, B_new, k, error, zero) in zip(checkpoint.modules, factors):
            kind = dtype or _writable(module.stored_dtype)
            a_shape, b_shape = _conv_shapes(module, k) if module.layer_type == "conv" else (A_new.shape, B_new.shape)
            if module.layer_type == "conv" and len(a_shape) == 2:
                flat.append(module.name)
            names = ((f"{module.name}.lora_down.weight", f"{module.name}.lora_up.weight") if kohya else
                     (f"{module.name}.lora_A.weight", f"{module.name}.lora_B.weight"))
            out[names[0]] = _encoded(f"{module.name}: its new A", A_new.reshape(a_shape), kind)
            out[names[1]] = _encoded(f"{module.name}: its new B", B_new.reshape(b_shape), kind)
            if kohya:
                out[f"{module.name}.alpha"] = ("F32", (), encode_tensor(np.array(module.scale * k), "F32"))
            ranks[module.name] = k
            rows.append({"name": module.name, "rank_before": module.rank, "rank_after": k, "error": error,
                         "params_before": int(module.structure["params"]),
                         "params_after": k * (module.in_features + module.out_features), "zero": zero})
    finally:
        tf.close()
    methods = sorted({m.method for m in checkpoint.modules})
    notes = [f"{' and '.join({'loha': 'LoHa', 'lokr': 'LoKr'}[x] for x in methods)} modules were turned into LoRA: each is the best "
             f"rank-k approximation of its exact ΔW; the output is a {'kohya' if kohya else 'PEFT'} LoRA adapter"]
    if flat:
        notes.append(f"{len(flat)} conv module(s) ({flat[0]}{', ...' if len(flat) > 1 else ''}) store their factors "
                     "flattened, so the kernel size is not in the file: their LoRA factors are written 2-D, "
                     "(k, in·kh·kw) and (out, k); loaders that expect (k, in, kh, kw) need them reshaped")
    if checkpoint.skipped:
        notes.append(f"{len(checkpoint.skipped)} tensor(s) that are not LoHa / LoKr factors were not written "
                     f"({checkpoint.skipped[0]}{', ...' if len(checkpoint.skipped) > 1 else ''})")
    zero = [r["name"] for r in rows if r["zero"]]
    if zero:
        notes.append(f"{len(zero)} module(s) have a zero update ({zero[0]}{', ...' if len(zero) > 1 else ''}): "
                     f"kept at rank {rule['module_min']} with zeros")
    return out, rows, ranks, notes


def _writable(dtype: str) -> str:
    return dtype if dtype in ("F64", "F32", "F16", "BF16") else "F32"


def _common(values: list[int]) -> int:
    counts = Counter(values)
    return max(counts, key=lambda k: (counts[k], k))


def lora_config(checkpoint: Checkpoint, ranks: dict[str, int]) -> dict[str, Any] | None:
    """The LoraConfig (adapter_config.json) of the LoRA adapter written for a PEFT LoHa / LoKr one; None for
    LyCORIS files (they have no config) or an adapter without one."""
    if checkpoint.format == "lycoris" or checkpoint.config is None:
        return None
    source = checkpoint.config
    config: dict[str, Any] = {"peft_type": "LORA"}
    config.update({key: source[key] for key in _CARRIED if key in source})
    modules = [{"name": m.name, "scale": m.scale} for m in checkpoint.modules]
    config.update(peft_fragment(modules, [ranks[m.name] for m in checkpoint.modules], _common(list(ranks.values())),
                                False))
    config.update(lora_dropout=0.0, bias="none", fan_in_fan_out=False, init_lora_weights=True, use_rslora=False)
    return config


def kohya_metadata(metadata: dict[str, str], checkpoint: Checkpoint, ranks: dict[str, int]) -> dict[str, str]:
    """A LyCORIS file's safetensors metadata, rewritten for the kohya LoRA written from it."""
    metadata = dict(metadata)
    dims = set(ranks.values())
    alphas = {round(m.scale * ranks[m.name], 10) for m in checkpoint.modules}
    if "ss_network_module" in metadata:
        metadata["ss_network_module"] = "networks.lora"
    if "ss_network_args" in metadata:  # algo=loha / lokr, factor, use_tucker: none of them describe a LoRA now
        metadata["ss_network_args"] = json.dumps({})
    if "ss_network_dim" in metadata:
        metadata["ss_network_dim"] = str(dims.pop()) if len(dims) == 1 else "Dynamic"
    if "ss_network_alpha" in metadata:
        metadata["ss_network_alpha"] = f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic"
    return metadata


__all__ = ["is_structured", "new_factors", "structured_entries", "lora_config", "kohya_metadata"]
