"""GGUF LoRA adapters, as llama.cpp's ``convert_lora_to_gguf.py`` writes them and its loader reads them.

The file says what it is: ``general.type = "adapter"``, ``adapter.type = "lora"``, ``general.architecture``
and one ``adapter.lora.alpha`` for the whole file. Each adapted tensor ``W`` (``blk.0.attn_q.weight``) has
``W.lora_a`` and ``W.lora_b``: in numpy order lora_a is (r, in) and lora_b (out, r), as PEFT stores them (in
ggml's order a is [in, r] and b [r, out]). llama.cpp checks that a's ne[1] equals b's ne[0] (the rank) and
scales each update by ``alpha / r`` with r = b's ne[0], or by 1 when alpha is 0 or absent (times the
user's ``--lora-scaled`` factor, 1 by default). The token embedding is the exception: its lora_a is stored
transposed, (vocab, r). Tensors ending in ``_norm.weight`` (mergekit-extract-lora) are not LoRA pairs.

Module names are mapped back to Hugging Face names through ``gguf``'s tensor-name map for the architecture
when it knows the architecture and every module; otherwise the GGUF names are kept. Either way a note says so.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Callable

import numpy as np

from rankscope.errors import RankscopeError
from rankscope.io.formats import LoraModule, ParsedCheckpoint
from rankscope.io.gguf import READABLE_TYPES, GgufFile
from rankscope.io.validate import describe, is_number

GGUF_FORMAT = "gguf"
ALPHA_KEY = "adapter.lora.alpha"
LORA_SUFFIXES = {".lora_a": "A", ".lora_b": "B"}
_BLOCK = re.compile(r"^blk\.(\d+)\.")
_TOKEN_EMBD = "token_embd"
_PREFERRED = (re.compile(r"^model\.layers\.\d+\.(?:self_attn|mlp)\.[a-z_]+_proj$"),
              re.compile(r"^model\.layers\.\d+\.(?:self_attn|mlp)\."), re.compile(r"^model\.layers\.\d+\."),
              re.compile(r"^lm_head$"), re.compile(r"^model\.[a-z_]+$"), re.compile(r"^model\."))


def adapter_alpha(tf: GgufFile) -> float:
    """``adapter.lora.alpha`` as llama.cpp reads it: 0 when absent (then it applies scale 1)."""
    alpha = tf.metadata.get(ALPHA_KEY, 0.0)
    if not is_number(alpha) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise RankscopeError(f"{tf.path}: {ALPHA_KEY} is {describe(alpha)}, expected a finite number (the "
                             "adapter's lora_alpha)")
    return float(alpha)


def gguf_scale(alpha: float, rank: int) -> float:
    """llama.cpp's scale of one update: ``alpha / r``, or 1 when alpha is 0 (llama_adapter_lora_weight::get_scale)."""
    return alpha / rank if alpha else 1.0


def check_adapter(tf: GgufFile) -> str:
    """Refuse a GGUF file that is not a LoRA adapter (a model, a control vector); returns its architecture."""
    general_type = tf.metadata.get("general.type")
    if general_type != "adapter":
        found = ("no general.type" if general_type is None else f"general.type {general_type!r}"
                 if isinstance(general_type, str) else f"general.type {describe(general_type)}")
        what = " (a model, not an adapter)" if general_type in (None, "model") else ""
        raise RankscopeError(f"{tf.path} is a GGUF file with {found}{what}: expected a LoRA adapter "
                             "(general.type \"adapter\", as convert_lora_to_gguf.py writes)")
    adapter_type = tf.metadata.get("adapter.type")
    if adapter_type != "lora":
        raise RankscopeError(f"{tf.path} is a GGUF adapter with adapter.type {describe(adapter_type)}: expected \"lora\"")
    arch = tf.metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise RankscopeError(f"{tf.path}: general.architecture is {describe(arch)}, expected the base model's "
                             "architecture name (llama, qwen2, ...)")
    return arch


def _reader(tf: GgufFile, key: str, transpose: bool) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        array = tf[key]
        return array.T if transpose else array

    return read


def parse_gguf_checkpoint(tf: GgufFile, format: str | None = None) -> ParsedCheckpoint:
    """The LoRA modules of a GGUF adapter, checked by llama.cpp's loader rules."""
    if format not in (None, GGUF_FORMAT):
        raise RankscopeError(f"{tf.path} is a GGUF file: its format is {GGUF_FORMAT}, not {format}")
    arch = check_adapter(tf)
    alpha = adapter_alpha(tf)
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    skipped: list[str] = []
    for key in tf:
        suffix = key[-7:]
        if suffix in LORA_SUFFIXES:
            groups[key[:-7]][LORA_SUFFIXES[suffix]] = key
        else:
            skipped.append(key)
    notes: set[str] = set()
    modules: list[LoraModule] = []
    for base, parts in groups.items():
        if "A" not in parts or "B" not in parts:
            missing = "lora_b" if "A" in parts else "lora_a"
            raise RankscopeError(f"{tf.path}: tensor {base!r} has a {'lora_a' if missing == 'lora_b' else 'lora_b'} "
                                 f"but no {missing}: expected both halves of each LoRA pair")
        modules.append(_module(tf, base, parts, alpha))
    if not modules:
        sample = ", ".join(list(tf)[:3]) + (", ..." if len(tf) > 3 else "")
        raise RankscopeError(f"{tf.path} is a GGUF LoRA adapter with no LoRA pairs ({len(tf)} tensors: {sample or 'none'}): "
                             "expected tensors named '<tensor>.lora_a' / '<tensor>.lora_b'")
    kinds = sorted({m.stored_dtype for m in modules} | {tf.dtype(m.keys["B"]) for m in modules})
    if "Q8_0" in kinds:
        notes.add("Q8_0 factors are dequantised exactly (each block's float16 scale times its int8 values)")
    if alpha:
        notes.add(f"scale = {ALPHA_KEY} / r per module ({alpha:g} / r), as llama.cpp applies it "
                  "(times its --lora-scaled factor, 1 by default)")
    else:
        notes.add(f"no {ALPHA_KEY} (or 0): llama.cpp applies these updates at scale 1 (times its --lora-scaled "
                  "factor), and so does rankscope")
    if skipped:
        notes.add(f"{len(skipped)} tensor(s) that are not LoRA pairs (e.g. {skipped[0]}) are not analysed")
    notes.add(_rename(modules, arch))
    return ParsedCheckpoint(GGUF_FORMAT, modules, skipped, sorted(notes))


def _module(tf: GgufFile, base: str, parts: dict[str, str], alpha: float) -> LoraModule:
    a_shape, b_shape = tf.shape(parts["A"]), tf.shape(parts["B"])
    embedding = base.removesuffix(".weight") == _TOKEN_EMBD
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise RankscopeError(f"{tf.path}: {base!r} has lora_a {list(a_shape)} and lora_b {list(b_shape)}: rankscope reads "
                             "2-D LoRA factors (numpy order: lora_a (r, in), lora_b (out, r))")
    rank = a_shape[1] if embedding else a_shape[0]
    if rank != b_shape[1]:
        expected = "(vocab, r) and (embd, r) for token_embd" if embedding else "(r, in) and (out, r)"
        raise RankscopeError(f"{tf.path}: {base!r} has lora_a {list(a_shape)} and lora_b {list(b_shape)} (numpy order), "
                             f"which do not chain: expected {expected} with the same r (llama.cpp: a's ne[1] == b's ne[0])")
    for key in (parts["A"], parts["B"]):
        if tf.dtype(key) not in READABLE_TYPES:
            raise RankscopeError(f"{tf.path}: tensor {key!r} is stored as {tf.dtype(key)}, which rankscope does not read: "
                                 f"expected {', '.join(READABLE_TYPES[:-1])} or {READABLE_TYPES[-1]} (read exactly)")
    in_features = a_shape[0] if embedding else a_shape[1]
    if rank == 0 or in_features == 0 or b_shape[0] == 0:
        raise RankscopeError(f"{tf.path}: {base!r} has lora_a {list(a_shape)} and lora_b {list(b_shape)}: expected r, "
                             "in and out all ≥ 1")
    module = LoraModule(
        name=base.removesuffix(".weight"), rank=rank, scale=gguf_scale(alpha, rank), in_features=in_features,
        out_features=b_shape[0], stored_dtype=tf.dtype(parts["A"]), layer_type="embedding" if embedding else "linear",
        keys=dict(parts), _read_A=_reader(tf, parts["A"], embedding), _read_B=_reader(tf, parts["B"], False),
    )
    module.scale_source = ALPHA_KEY  # the field LoraModule gains at merge (shown by analyze); harmless before
    return module


def _hf_map(arch: str, names: list[str]) -> dict[str, str] | None:
    """GGUF base names -> Hugging Face names through gguf's tensor-name map, or None when it does not know them all."""
    import gguf  # llama.cpp's own name maps

    by_name = {value: key for key, value in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        return None
    blocks = [int(m.group(1)) for m in map(_BLOCK.match, names) if m]
    tensor_map = gguf.get_tensor_name_map(by_name[arch], max(blocks, default=0) + 1)
    candidates: dict[str, list[str]] = defaultdict(list)
    for hf_name, (_, gguf_name) in tensor_map.mapping.items():
        candidates[gguf_name].append(hf_name)
    out = {}
    for name in names:
        options = [c for c in candidates.get(name, []) if c != name]  # the map also lists GGUF names themselves
        if not options:
            return None
        out[name] = min(options, key=lambda c: (_preference(c), options.index(c)))
    return out


def _preference(name: str) -> int:
    """Transformers' names first (``model.layers.N.self_attn.q_proj``): the map lists every model family's."""
    for i, pattern in enumerate(_PREFERRED):
        if pattern.match(name):
            return i
    return len(_PREFERRED)


def _rename(modules: list[LoraModule], arch: str) -> str:
    """Give the modules Hugging Face names where gguf's map knows them all; the note saying what was done."""
    names = [m.name for m in modules]
    mapping = _hf_map(arch, names)
    if mapping is None:
        return (f"module names are llama.cpp's GGUF names (blk.N....): gguf's tensor-name map does not know "
                f"architecture {arch!r} or all of its tensors")
    for module in modules:
        module.name = mapping[module.name]
    example = names[0]
    return (f"module names mapped from GGUF to Hugging Face names with gguf's tensor-name map for {arch!r} "
            f"({example} -> {mapping[example]})")
