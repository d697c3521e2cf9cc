"""``rankscope resize``: a smaller adapter, in the format it came in, with a rank per module.

Each module's update ``ΔW = scale · B A`` is replaced by its best rank-k approximation (the
truncated SVD, Eckart–Young: best in both the Frobenius and the spectral norm), computed through
the r×r core (:func:`rankscope.importance.truncated_factors`), never a d×k matrix, with the
singular values split evenly between the new B and A. The scale stays as trained: the new config
(PEFT ``rank_pattern`` / ``alpha_pattern``, kohya ``alpha``, mlx-lm ``scale``) reproduces it at
the new rank. k comes from one of three rules (:func:`rankscope.suggest.module_rank`, shared with
``rankscope suggest``): an energy share, one rank for all, or a maximum relative error.

What is exact, and so resized: plain LoRA on Linear, GPT-2 Conv1D, Conv (A flattened to
(r, in·kh·kw) and reshaped back) and embedding layers, and the authors' BeamLoRA format (its gate
folded into A). What is refused, with the module and the reason: DoRA (its applied update rescales
W0 + B·A by a learned magnitude, so truncating B·A is not the best approximation of what the layer
applies) and AdaLoRA (its rank budget lives in its own masks and schedule).

Tensors that are not LoRA pairs (``modules_to_save`` heads, ``lora_B`` biases) are copied byte for
byte. The output folder is written aside and renamed into place, so a crash leaves nothing half
written, and the input is never touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rankscope.adapters import structured_resize
from rankscope.constants import ADAPTER_CONFIG, RESIZE_SCHEMA, SCORES_FILE, STATE_FILE, TRAINER_STATE
from rankscope.errors import RankscopeError
from rankscope.io.atomic import check_out, output_folder, write_chunks, write_json, write_with
from rankscope.io.formats import ADAPTER_METADATA_KEY, LoraModule, enable_lora_blocks, split_adapter_metadata
from rankscope.io.gguf import GgufFile, write_gguf
from rankscope.io.gguf_lora import GGUF_FORMAT, adapter_alpha, gguf_scale
from rankscope.io.loading import Checkpoint, load_checkpoint, resolve_adapter
from rankscope.io.tensors import (
    PICKLE_SUFFIXES,
    encode_safetensors,
    encode_tensor,
    float_to_bf16_bits,
    open_tensor_file,
)
from rankscope.maths import importance as imp
from rankscope.maths.analysis import analysis_threads, one_blas_thread
from rankscope.maths.suggest import check_energy, module_rank, peft_fragment
from rankscope.tasks.evaluate import build_evaluation
from rankscope.tasks.placement import Placement

SCHEMA = RESIZE_SCHEMA
DTYPES = {"keep": None, "fp32": "F32", "bf16": "BF16", "fp16": "F16"}
# Files beside an adapter that describe training state of the old shapes: never copied.
_TRAINING_STATE = {"optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin", TRAINER_STATE,
                   STATE_FILE, SCORES_FILE}


@dataclass
class ResizedModule:
    name: str
    rank_before: int
    rank_after: int
    error: float  # relative Frobenius error of the truncation, ‖ΔW − ΔW_k‖ / ‖ΔW‖
    params_before: int
    params_after: int
    zero: bool = False  # a zero update (kept at the minimum rank, with zeros)


@dataclass
class ResizeResult:
    source: str
    out: str
    format: str
    rule: dict[str, Any]
    modules: list[ResizedModule]
    bytes_before: int
    bytes_after: int
    notes: list[str] = field(default_factory=list)
    validation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "source": self.source, "out": self.out, "format": self.format, "rule": self.rule,
                "ranks_before": imp.band(m.rank_before for m in self.modules),
                "ranks_after": imp.band(m.rank_after for m in self.modules),
                "params_before": sum(m.params_before for m in self.modules),
                "params_after": sum(m.params_after for m in self.modules),
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "error": imp.band(m.error for m in self.modules),
                "modules": [vars(m) for m in self.modules], "notes": self.notes, "validation": self.validation}

    def summary_lines(self) -> list[str]:
        d = self.to_dict()
        before, after, err = d["ranks_before"], d["ranks_after"], d["error"]
        lines = [f"resize: {self.source} -> {self.out} ({self.format}, {len(self.modules)} modules, "
                 f"{_rule_text(self.rule)})",
                 f"  ranks          {_rank_text(before)} -> {_rank_text(after)}",
                 f"  parameters     {_count(d['params_before'])} -> {_count(d['params_after'])} "
                 f"({d['params_after'] / max(1, d['params_before']):.1%})   file {_size(self.bytes_before)} -> "
                 f"{_size(self.bytes_after)}",
                 f"  error          relative Frobenius ‖ΔW − ΔW_k‖/‖ΔW‖ median {err['median']:.4f}, worst "
                 f"{err['max']:.4f} ({max(self.modules, key=lambda m: m.error).name})"]
        if self.validation:
            v = self.validation
            lines.append(f"  {v['metric']:<14} {v['before']:.4f} -> {v['after']:.4f} on {v['description']}")
        lines += [f"  note           {note}" for note in self.notes]
        return lines


def _rule_text(rule: dict[str, Any]) -> str:
    if rule.get("energy") is not None:
        return f"{rule['energy']:.0%} of each module's energy"
    if rule.get("rank") is not None:
        return f"rank {rule['rank']} for every module"
    return f"relative error ≤ {rule['max_error']:g} per module"


def _rank_text(band: dict[str, float]) -> str:
    if band["min"] == band["max"]:
        return f"{band['min']:g}"
    return f"median {band['median']:g} (range {band['min']:g}–{band['max']:g})"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def check_rule(energy: float | None, rank: int | None, max_error: float | None, module_min: int = 1) -> dict[str, Any]:
    """Exactly one rule, each in its range; raises a one-line error before anything is read."""
    given = [name for name, value in (("--energy", energy), ("--rank", rank), ("--max-error", max_error))
             if value is not None]
    if len(given) != 1:
        raise RankscopeError(f"{' and '.join(given) or 'no rule'} given: expected exactly one of --energy, --rank, "
                             "--max-error")
    if energy is not None:
        check_energy(energy)
    if rank is not None and not (isinstance(rank, int) and rank >= 1):
        raise RankscopeError(f"--rank {rank!r}: expected an integer ≥ 1")
    if max_error is not None and not (isinstance(max_error, (int, float)) and 0 < max_error < 1):
        raise RankscopeError(f"--max-error {max_error!r}: expected a relative Frobenius error in (0, 1), e.g. 0.05")
    if not (isinstance(module_min, int) and module_min >= 1):
        raise RankscopeError(f"--module-min {module_min!r}: expected an integer ≥ 1")
    return {"energy": energy, "rank": rank, "max_error": max_error, "module_min": module_min}


def _check_out(given: Path, weights: Path, out: Path, overwrite: bool) -> None:
    """Never write into or over the input; replace an existing folder only with --overwrite, and only one that
    rankscope wrote as an adapter (:func:`rankscope.io.atomic.check_out`): nothing else is ever deleted."""
    folder, target = weights.parent.resolve(), out.resolve()
    # The adapter's folder, the path given, or any folder holding them would be replaced: never the input.
    # A new folder inside a run folder (runs/x/resized-95) is fine: nothing of the input is touched.
    if target in (folder, given.resolve()) or target in folder.parents:
        raise RankscopeError(f"--out {out} overlaps the input {given}: expected a separate folder "
                             "(the input is never modified)")
    check_out(out, "adapter", replace=overwrite)


def _refuse_inexact(checkpoint: Checkpoint) -> None:
    for module in checkpoint.modules:
        if module.dora:
            raise RankscopeError(f"{module.name} is a DoRA module: its applied update rescales W0 + B·A by a learned "
                                 "magnitude, so truncating B·A is not the best approximation of what the layer "
                                 "applies; rankscope resize does not resize DoRA adapters")
        if module.E is not None:
            raise RankscopeError(f"{module.name} is an AdaLoRA module: its rank budget lives in AdaLoRA's own masks "
                                 "and schedule; rankscope resize does not resize AdaLoRA adapters (set AdaLoRA's "
                                 "target_r instead)")


def _stored(array: np.ndarray, like: tuple[int, ...], transposed: bool) -> np.ndarray:
    """A new (k, in) A or (out, k) B in the file's own layout: mlx-lm transposed, conv 4-D."""
    if transposed:
        return np.ascontiguousarray(array.T)
    if len(like) > 2:
        if like[1:] and all(d == 1 for d in like[2:]) and array.shape[0] == like[0]:  # B (out, r, 1, 1)
            return array.reshape(array.shape[0], array.shape[1], *like[2:])
        return array.reshape(array.shape[0], *like[1:])  # A (r, in, kh, kw)
    return array


def _new_factors(module: LoraModule, rule: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int, float, bool]:
    """(A', B', k, error, zero) for one module under ``rule``."""
    A, B = module.A, module.B
    if not (np.isfinite(A).all() and np.isfinite(B).all()):
        raise RankscopeError(f"{module.name} holds NaN or Inf in its A or B: it has no best rank-k approximation; "
                             "expected finite weights (rankscope analyze reports which modules are affected)")
    if not math.isfinite(module.scale):
        raise RankscopeError(f"{module.name} has scale {module.scale}: it has no best rank-k approximation; expected a "
                             "finite lora_alpha / r")
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            A_full, B_full, sigma = imp.truncated_factors(A, B, module.rank, module.rank_weights)
        except np.linalg.LinAlgError:
            sigma = np.array([np.inf])
    with np.errstate(over="ignore"):
        overflow = not np.isfinite(module.scale * sigma).all()  # ΔW = scale · B · A itself overflows
    if overflow or not (np.isfinite(A_full).all() and np.isfinite(B_full).all()):
        raise RankscopeError(f"the update of {module.name} overflows float64 (largest |A| {np.abs(A).max():.3g}, |B| "
                             f"{np.abs(B).max():.3g}, scale {module.scale:.3g}): it has no finite best rank-k "
                             "approximation; expected weights whose product with the scale is finite")
    zero = not sigma.any()
    k = module_rank(sigma, module.rank, energy=rule["energy"], fixed=rule["rank"], max_error=rule["max_error"],
                    module_min=rule["module_min"])
    A_new = np.zeros((k, module.in_features))
    B_new = np.zeros((module.out_features, k))
    n = min(k, A_full.shape[0])  # directions beyond min(in, out) do not exist: zero slots
    A_new[:n], B_new[:, :n] = A_full[:n], B_full[:, :n]
    return A_new, B_new, k, imp.truncation_error(sigma, k), zero


def _all_new_factors(checkpoint: Checkpoint, rule: dict[str, Any], compute=_new_factors) -> Iterator[tuple]:
    """:func:`_new_factors` of every module in order, a few modules at a time as ``analyze`` does (numpy
    releases the GIL; BLAS on one thread each), at most ``2 × threads`` results waiting to be encoded."""
    threads = analysis_threads()
    with one_blas_thread():
        if threads == 1 or len(checkpoint.modules) <= 8:
            yield from (compute(m, rule) for m in checkpoint.modules)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            pending = deque()
            for module in checkpoint.modules:
                pending.append(pool.submit(compute, module, rule))
                if len(pending) >= 2 * threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


def _tensor_entries(checkpoint: Checkpoint, rule: dict[str, Any], dtype: str | None) -> tuple[
        dict[str, tuple[str, tuple[int, ...], bytes]], list[ResizedModule], dict[str, int], list[str]]:
    """Every tensor of the output file: resized A/B, rescaled alphas, everything else copied as stored."""
    tf = open_tensor_file(checkpoint.path)
    transposed = checkpoint.format == "mlx"
    out: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    rows, ranks, notes = [], {}, []
    claimed: set[str] = set()
    fused: dict[str, list[tuple[LoraModule, np.ndarray, np.ndarray]]] = {}  # old PEFT enable_lora: by lora_A key
    try:
        for module, (A_new, B_new, k, error, zero) in zip(checkpoint.modules, _all_new_factors(checkpoint, rule)):
            if checkpoint.format == "peft-enable-lora":  # written below, once every sub-adapter's rank is known
                fused.setdefault(module.keys["A"], []).append((module, A_new, B_new))
                claimed.update(module.keys.values())
                ranks[module.name] = k
                params = module.in_features + module.out_features
                rows.append(ResizedModule(module.name, module.rank, k, error, module.rank * params, k * params, zero))
                continue
            for role, array in (("A", A_new), ("B", B_new)):
                key = module.keys[role]
                like = tf.shape(key)
                if role == "A" and "mid" in module.keys:  # LoCon's Tucker core is folded in: (k, in, kh, kw)
                    like = (like[0], like[1], *tf.shape(module.keys["mid"])[2:])
                stored = _stored(array, like, transposed)
                kind = dtype or _writable(tf.dtype(key))
                largest = float(np.abs(stored).max()) if stored.size else 0.0
                if largest > _LARGEST[kind]:
                    raise RankscopeError(f"{module.name}: its new {role} reaches {largest:.4g}, beyond the largest "
                                         f"{kind} number ({_LARGEST[kind]:.4g}), so writing {kind} would store Inf: "
                                         "expected --dtype fp32 (or bf16) for this adapter")
                out[key] = (kind, stored.shape, encode_tensor(stored, kind))
            if "alpha" in module.keys:  # kohya / diffusers: alpha / r must stay the trained scale
                key = module.keys["alpha"]
                kind = _writable(tf.dtype(key))
                value = np.full(tf.shape(key), module.scale * k)
                out[key] = (kind, tf.shape(key), encode_tensor(value, kind))
            elif checkpoint.format == "kohya" or module.scale_source == "ss_network_alpha":
                # Without its own alpha a kohya module falls back to ss_network_alpha / r, which the new r would
                # change (and the metadata may now say "Dynamic"): give it an explicit one.
                out[f"{module.name}.alpha"] = ("F32", (), encode_tensor(np.array(module.scale * k), "F32"))
            claimed.update(module.keys.values())  # a folded BeamLoRA gate is claimed and not written
            ranks[module.name] = k
            params = module.in_features + module.out_features
            rows.append(ResizedModule(module.name, module.rank, k, error, module.rank * params, k * params, zero))
        if fused:
            notes.append(_write_enable_lora(tf, checkpoint, fused, ranks, rows, dtype, out))
        for key in tf:
            if key not in claimed:
                out[key] = _copied(tf, key)
        if any(m.rank_weights is not None for m in checkpoint.modules):
            notes.append("BeamLoRA gates (lora_gate) were folded into A: the output is a plain LoRA adapter")
    finally:
        tf.close()
    zero = [m.name for m in rows if m.zero]
    if zero:
        notes.append(f"{len(zero)} module(s) have a zero update ({zero[0]}{', ...' if len(zero) > 1 else ''}): "
                     f"kept at rank {rule['module_min']} with zeros")
    return out, rows, ranks, notes


def _write_enable_lora(tf: Any, checkpoint: Checkpoint, fused: dict[str, list[tuple[LoraModule, np.ndarray, np.ndarray]]],
                       ranks: dict[str, int], rows: list[ResizedModule], dtype: str | None,
                       out: dict[str, tuple[str, tuple[int, ...], bytes]]) -> str:
    """Old PEFT (0.2) keeps one r for every MergedLinear: each sub-adapter is written at the largest chosen rank K,
    its extra slots zero (exact), A stacked (K·k, in) and B the grouped conv weight (out·k/n, K, 1)."""
    K = max(ranks.values())
    blocks = {label: (g, j) for g, (j, label) in enumerate(enable_lora_blocks(checkpoint.config["enable_lora"]))}
    n = len(checkpoint.config["enable_lora"])
    for subs in fused.values():
        first = subs[0][0]
        block_rows = first.out_features // n
        A = np.zeros((K * len(blocks), first.in_features))
        B = np.zeros((block_rows * len(blocks), K, 1))
        for module, A_new, B_new in subs:
            g, j = blocks[module.name.rsplit("[", 1)[1].rstrip("]")]
            k = A_new.shape[0]
            A[g * K:g * K + k] = A_new
            B[g * block_rows:(g + 1) * block_rows, :k, 0] = B_new[j * block_rows:(j + 1) * block_rows]
        for role, array in (("A", A), ("B", B)):
            key = first.keys[role]
            kind = dtype or _writable(tf.dtype(key))
            out[key] = (kind, array.shape, encode_tensor(array, kind))
    for row in rows:
        row.params_after = K * (row.params_after // max(1, row.rank_after))
        row.rank_after = K
    for name in ranks:
        ranks[name] = K
    return (f"old PEFT enable_lora keeps one r for all modules: every sub-adapter is written at rank {K} (the largest "
            "chosen), its slots beyond its own rank zero, so each update is still its best approximation")


_LARGEST = {"F64": float(np.finfo(np.float64).max), "F32": float(np.finfo(np.float32).max),
            "F16": float(np.finfo(np.float16).max), "BF16": 3.3895313892515355e38}  # finite numbers each dtype holds


def _writable(dtype: str) -> str:
    return dtype if dtype in ("F64", "F32", "F16", "BF16") else "F32"


def _copied(tf: Any, key: str) -> tuple[str, tuple[int, ...], bytes]:
    if hasattr(tf, "raw"):
        return tf.dtype(key), tf.shape(key), tf.raw(key)
    array = np.asarray(tf[key])  # a pickle: bf16 was widened on reading, write it back as float32
    kind = {"float64": "F64", "float32": "F32", "float16": "F16"}.get(str(array.dtype))
    if kind is None:
        raise RankscopeError(f"{tf.path}: tensor {key!r} has dtype {array.dtype}, which rankscope resize cannot copy")
    return kind, array.shape, encode_tensor(array, kind)


def _config_for(checkpoint: Checkpoint, rows: list[ResizedModule], ranks: dict[str, int]) -> dict | None:
    """The adapter_config.json beside the weights, rewritten to reproduce each module's new rank and scale."""
    config = dict(checkpoint.config) if checkpoint.config else None
    fmt = checkpoint.format
    if config is None:
        return None
    if fmt in ("peft", "torchtune", "diffusers-peft"):
        modules = [{"name": m.name, "scale": m.scale} for m in checkpoint.modules]
        fragment = peft_fragment(modules, [ranks[m.name] for m in checkpoint.modules],
                                 _common(list(ranks.values())), bool(config.get("use_rslora")))
        config.update(fragment)
        for key in ("use_beamlora", "beamlora_temperature"):  # the gates are folded: a plain LoRA adapter
            config.pop(key, None)
    elif fmt == "peft-enable-lora":  # PEFT 0.2: one r and one lora_alpha (no rank_pattern); scale kept at the new r
        r = max(ranks.values())
        scales = {m.scale for m in checkpoint.modules}
        config["r"] = r
        config["lora_alpha"] = round(scales.pop() * r, 10) if len(scales) == 1 else config.get("lora_alpha")
    elif fmt == "mlx":
        params = dict(config.get("lora_parameters") or {})
        scales = {m.scale for m in checkpoint.modules}
        params["rank"] = max(ranks.values())
        params["scale"] = scales.pop() if len(scales) == 1 else params.get("scale")
        config["lora_parameters"] = params
        if "rank" in config:
            config["rank"] = params["rank"]
    return config


def _common(values: list[int]) -> int:
    """The most common rank (the largest among ties): PEFT's r, with rank_pattern for the rest."""
    counts = Counter(values)
    return max(counts, key=lambda k: (counts[k], k))


def _metadata(checkpoint: Checkpoint, ranks: dict[str, int]) -> dict[str, str]:
    tf = open_tensor_file(checkpoint.path)
    metadata = dict(getattr(tf, "metadata", {}) or {})
    tf.close()
    if checkpoint.format in ("kohya", "comfyui"):  # explicit alpha tensors were written: the network's values follow
        dims = set(ranks.values())
        alphas = {round(m.scale * ranks[m.name], 10) for m in checkpoint.modules}
        if "ss_network_dim" in metadata:
            metadata["ss_network_dim"] = str(dims.pop()) if len(dims) == 1 else "Dynamic"
        if "ss_network_alpha" in metadata:
            metadata["ss_network_alpha"] = f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic"
    elif checkpoint.format == "lora-diffusion":  # cloneofsimo keeps each module's rank beside it: `unet:17:rank`
        for name, k in ranks.items():
            if f"{name}:rank" in metadata:
                metadata[f"{name}:rank"] = str(k)
    if ADAPTER_METADATA_KEY in metadata:  # diffusers' LoraConfig(s), whatever the key family
        metadata[ADAPTER_METADATA_KEY] = _diffusers_metadata(checkpoint, ranks, metadata[ADAPTER_METADATA_KEY])
    return metadata


def _diffusers_metadata(checkpoint: Checkpoint, ranks: dict[str, int], raw: str) -> str:
    """Each component's LoraConfig in diffusers' metadata (flat, keyed by component, or packed as ``unet.r``), with
    r, lora_alpha, rank_pattern and alpha_pattern giving every module its new rank and its trained scale."""
    meta = json.loads(raw)  # parsed and checked when the adapter was read
    components = split_adapter_metadata(meta)
    placed: set[str] = set()
    for prefix in sorted(components, key=len, reverse=True):  # as the reader: text_encoder_2 before text_encoder
        config = components[prefix]
        inside = [m for m in checkpoint.modules if m.name not in placed and (not prefix or m.name.startswith(prefix + "."))]
        placed.update(m.name for m in inside)
        if not inside:
            continue
        modules = [{"name": m.name.removeprefix(prefix + ".") if prefix else m.name, "scale": m.scale} for m in inside]
        fragment = peft_fragment(modules, [ranks[m.name] for m in inside], _common([ranks[m.name] for m in inside]),
                                 bool(config.get("use_rslora")))
        if not prefix:
            meta.update(fragment)
        elif isinstance(meta.get(prefix), dict):
            meta[prefix].update(fragment)
        else:  # diffusers' pipelines pack each component's fields as "<prefix>.<field>"
            meta.update({f"{prefix}.{key}": value for key, value in fragment.items()})
    return json.dumps(meta, indent=2, sort_keys=True)


def _copy_side_files(source: Path, weights: Path, target: Path) -> None:
    """Tokenizer files, model cards and the like; never the old weights or training state."""
    for path in sorted(source.iterdir()):
        if (not path.is_file() or path == weights or path.name in _TRAINING_STATE or path.name.startswith(".")
                or path.name == ADAPTER_CONFIG or path.suffix in (".safetensors", *PICKLE_SUFFIXES)
                or path.name.startswith("rng_state")):
            continue
        shutil.copy2(path, target / path.name)


def resize(adapter: str | os.PathLike | Checkpoint, out: str | os.PathLike, *, energy: float | None = None,
           rank: int | None = None, max_error: float | None = None, module_min: int = 1, dtype: str = "keep",
           overwrite: bool = False, step: int | None = None, format: str | None = None) -> ResizeResult:
    """Write a resized copy of ``adapter`` (a checkpoint, adapter folder or run folder: its final adapter, or the
    snapshot at ``step``) into the folder ``out``, in the input's own format. Exactly one of ``energy``, ``rank``,
    ``max_error`` chooses each module's rank (see the module doc); ``dtype`` is keep, fp32, bf16 or fp16."""
    rule = check_rule(energy, rank, max_error, module_min)
    if dtype not in DTYPES:
        raise RankscopeError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out)
    checkpoint = resolve_adapter(adapter, step, format)
    source = checkpoint.path
    _check_out(Path(adapter if not isinstance(adapter, Checkpoint) else source), source, out, overwrite)
    _refuse_inexact(checkpoint)
    if checkpoint.format == GGUF_FORMAT:
        return _resize_gguf(checkpoint, out, rule, DTYPES[dtype], overwrite)
    if structured_resize.is_structured(checkpoint):  # LoHa / LoKr: written as a LoRA adapter
        tensors, rows, ranks, notes, config, metadata = _structured_plan(checkpoint, rule, DTYPES[dtype])
    else:
        tensors, rows, ranks, notes = _tensor_entries(checkpoint, rule, DTYPES[dtype])
        config = _config_for(checkpoint, rows, ranks)
        metadata = _metadata(checkpoint, ranks) if source.suffix == ".safetensors" else {}
    with output_folder(out, "adapter", replace=overwrite) as tmp:
        target = tmp / source.name
        if source.suffix in PICKLE_SUFFIXES:
            _save_pickle(target, tensors)
        else:
            write_chunks(target, encode_safetensors(tensors, metadata))
        if config is not None:
            write_json(tmp / ADAPTER_CONFIG, config)
        if checkpoint.config is not None:  # an adapter folder: its tokenizer and model card come along
            _copy_side_files(source.parent, source, tmp)
        bytes_after = target.stat().st_size
    if checkpoint.format in ("peft", "torchtune") and config is None:
        notes.append("no adapter_config.json beside the input: the output has none either")
    return ResizeResult(str(source), str(out), checkpoint.format, rule, rows, source.stat().st_size, bytes_after, notes)


# GGUF tensor types resize writes as they came; any other (Q8_0) becomes F16 (F32 where F16 would overflow).
_GGUF_KEPT = ("F32", "F16", "BF16", "F64")
_FILE_TYPES = {"F32": 0, "F16": 1, "BF16": 32}  # general.file_type (llama_ftype) of a file of one type


def _resize_gguf(checkpoint: Checkpoint, out: Path, rule: dict[str, Any], dtype: str | None,
                 overwrite: bool) -> ResizeResult:
    """A llama.cpp GGUF adapter, resized into a GGUF adapter that llama.cpp's loader accepts.

    llama.cpp has one ``adapter.lora.alpha`` per file and scales each update by alpha / r, r its lora_b's rank:
    with per-module ranks k the file's alpha is kept, and each new B and A carry √(scale·k/alpha), so that
    (alpha/k)·B'·A' is exactly the module's best rank-k update (for alpha 0 llama.cpp's scale stays 1: √scale).
    Every key/value field is copied (general.file_type follows the new tensor types); tensors that are not
    LoRA pairs are copied byte for byte.
    """
    tf = GgufFile(checkpoint.path)
    source = checkpoint.path
    try:
        alpha = adapter_alpha(tf)
        by_key = {}
        rows, notes, written, lora_kinds = [], [], set(), set()
        for module, (A_new, B_new, k, error, zero) in zip(checkpoint.modules, _all_new_factors(checkpoint, rule)):
            root = math.sqrt(module.scale / gguf_scale(alpha, k))
            A_new, B_new = A_new * root, B_new * root
            if module.layer_type == "embedding":  # token_embd: lora_a is stored transposed, (vocab, r)
                A_new = A_new.T
            for role, array in (("A", A_new), ("B", B_new)):
                key = module.keys[role]
                stored = tf.dtype(key)
                kind = dtype or (stored if stored in _GGUF_KEPT else "F16")
                largest = float(np.abs(array).max()) if array.size else 0.0
                if largest > _LARGEST[kind]:
                    if dtype or stored in _GGUF_KEPT:
                        raise RankscopeError(f"{module.name}: its new {role} reaches {largest:.4g}, beyond the largest "
                                             f"{kind} number ({_LARGEST[kind]:.4g}), so writing {kind} would store Inf: "
                                             "expected --dtype fp32 (or bf16) for this adapter")
                    kind = "F32"
                if kind != stored:
                    written.add((stored, kind))
                by_key[key] = (np.ascontiguousarray(array), kind)
                lora_kinds.add(kind)
            params = module.in_features + module.out_features
            rows.append(ResizedModule(module.name, module.rank, k, error, module.rank * params, k * params, zero))
        tensors = []
        for name in tf:
            if name in by_key:
                array, kind = by_key.pop(name)
                if kind == "BF16":
                    array = float_to_bf16_bits(array)
                tensors.append((name, array, kind))
            else:  # not a LoRA pair (a norm vector): its bytes as stored
                from gguf.quants import quant_shape_to_byte_shape  # the gguf package only reads GGUF files

                byte_shape = quant_shape_to_byte_shape(tf.shape(name), _ggml_type(tf.dtype(name)))
                tensors.append((name, tf.raw(name).reshape(byte_shape), tf.dtype(name)))
        fields = [_retyped(field, lora_kinds) for field in tf.fields]
        arch = str(tf.metadata["general.architecture"])
        alignment = tf.alignment
    finally:
        tf.close()
    for stored, kind in sorted(written):
        if stored not in _GGUF_KEPT and not dtype:
            notes.append(f"{stored} factors are written as {kind}: a resized factor is not a Q8_0 tensor's blocks "
                         "(re-quantise with llama.cpp's llama-quantize if needed)")
    notes.append(f"adapter.lora.alpha is kept ({alpha:g}); llama.cpp scales each module by alpha / its new rank, so the "
                 "new B and A carry the factor that keeps scale·B·A the truncated update exactly")
    zero = [m.name for m in rows if m.zero]
    if zero:
        notes.append(f"{len(zero)} module(s) have a zero update ({zero[0]}{', ...' if len(zero) > 1 else ''}): "
                     f"kept at rank {rule['module_min']} with zeros")
    with output_folder(out, "adapter", replace=overwrite) as tmp:
        target = tmp / source.name
        write_gguf(target, arch, fields, tensors, alignment)
        bytes_after = target.stat().st_size
    return ResizeResult(str(source), str(out), checkpoint.format, rule, rows, source.stat().st_size, bytes_after, notes)


def _ggml_type(name: str) -> Any:
    import gguf  # the gguf package only reads GGUF files

    return gguf.GGMLQuantizationType[name]


def _retyped(field: Any, kinds: set[str]) -> Any:
    """general.file_type rewritten to the one type every LoRA factor now has; any other field as it was."""
    if field.key == "general.file_type" and len(kinds) == 1 and next(iter(kinds)) in _FILE_TYPES:
        return dataclasses.replace(field, value=_FILE_TYPES[next(iter(kinds))])
    return field


def _structured_plan(checkpoint: Checkpoint, rule: dict[str, Any], dtype: str | None) -> tuple:
    """(tensors, rows, ranks, notes, config, metadata) of the LoRA adapter written for a LoHa / LoKr one
    (:mod:`rankscope.adapters.structured_resize`)."""
    factors = _all_new_factors(checkpoint, rule, structured_resize.new_factors)
    tensors, rows, ranks, notes = structured_resize.structured_entries(checkpoint, rule, dtype, factors)
    config = structured_resize.lora_config(checkpoint, ranks)
    metadata = {}
    if checkpoint.path.suffix == ".safetensors":
        tf = open_tensor_file(checkpoint.path)
        metadata = dict(getattr(tf, "metadata", {}) or {})
        tf.close()
        if checkpoint.format == "lycoris":
            metadata = structured_resize.kohya_metadata(metadata, checkpoint, ranks)
    return tensors, [ResizedModule(**row) for row in rows], ranks, notes, config, metadata


def evaluate_resize(original: Checkpoint, resized: str | os.PathLike, model_spec: str | None = None, data: str | None = None,
             metric: str | None = None, examples: int | None = None, run_config: dict | None = None,
             placement: Placement | None = None) -> dict[str, Any]:
    """The task metric of the original and of the resized adapter, on the same examples (``rankscope sweep``'s tasks).

    A ``beamlora train`` run supplies its own model, data and held-out split through ``run_config``;
    ``placement`` is the device, precision and batch size of the evaluation (None: CPU, float32).
    """

    values, description = [], ""
    for checkpoint in (original, load_checkpoint(Path(resized) / original.path.name)):
        task = build_evaluation(checkpoint, model_spec, data, metric, examples, run_config, placement)
        values.append(float(task.evaluate(task.model)))
        description, metric = task.description, task.metric
        del task  # one model in memory at a time
    return {"metric": metric, "before": values[0], "after": values[1], "description": description}


def _save_pickle(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    import torch  # only pickled adapters need torch

    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    state = {}
    for name, (kind, shape, data) in tensors.items():
        if kind not in dtypes:
            raise RankscopeError(f"tensor {name!r} has dtype {kind}: cannot write it into a PyTorch pickle")
        state[name] = torch.frombuffer(bytearray(data), dtype=dtypes[kind]).reshape(shape).clone() if data else \
            torch.zeros(shape, dtype=dtypes[kind])
    write_with(path, lambda tmp: torch.save(state, tmp))


__all__ = ["SCHEMA", "DTYPES", "resize", "evaluate_resize", "check_rule", "ResizeResult", "ResizedModule"]
