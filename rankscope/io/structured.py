"""Reading LoHa and LoKr adapters (PEFT's own, and LyCORIS / kohya files) into :class:`LoraModule` entries.

Their update is not one ``B A`` (:mod:`rankscope.maths.structured` has the maths):

- LoHa ``ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in[·kh·kw]), the
  same for w2; with a Tucker core (conv, PEFT ``use_effective_conv2d``, LyCORIS ``use_tucker``) ``hada_w1_a`` is
  (r, out), ``hada_w1_b`` (r, in) and ``hada_t1`` (r, r, kh, kw), ``W1[p, c, k] = Σ t1[i, j, k] w1_a[i, p] w1_b[j, c]``.
- LoKr ``ΔW = scale · kron(w1, w2)``: ``lokr_w1`` (a, c) or ``lokr_w1_a`` (a, r) @ ``lokr_w1_b`` (r, c); ``lokr_w2``
  (b, d[, kh, kw]) or ``lokr_w2_a`` (b, r) @ ``lokr_w2_b`` (r, d[·kh·kw]), or with ``lokr_t2`` (r, r, kh, kw) the
  Tucker form of w2 as for LoHa. out = a·b, in = c·d·kh·kw.

Here every Tucker core is folded into its ``b`` factor and every conv kernel flattened, so the maths sees 2-D
factors only: LoHa ``{"B1", "A1", "B2", "A2"}``, LoKr ``{"W1"}`` or ``{"B1", "A1"}`` and ``{"W2"}`` or ``{"B2", "A2"}``.

Scales. PEFT (LoHaConfig / LoKrConfig): ``alpha / r`` from adapter_config.json (``alpha_pattern`` / ``rank_pattern``),
for every module, full LoKr factors included (``peft/tuners/lokr/layer.py``). LyCORIS: ``alpha / r`` with the module's
``alpha`` tensor and r the stored rank (LoHa: ``hada_w1_b``'s rows; LoKr: ``lokr_w1_b``'s, else ``lokr_w2_b``'s);
a LoKr with both halves full, a missing alpha or alpha 0 has scale 1 (``lycoris/modules/lokr.py``). This is the
scale LyCORIS's forward applies (its ``get_diff_weight`` multiplies LoHa's by the scale twice; the forward, ComfyUI
and kohya's loaders once).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable

import numpy as np

from rankscope.errors import RankscopeError
from rankscope.io.formats import (
    ConfigPatterns,
    LoraModule,
    ParsedCheckpoint,
    check_float_tensor,
    parse_checkpoint,
    per_rank_vector,
)
from rankscope.io.tensors import TensorFile
from rankscope.io.validate import check_adapter_config

STRUCTURED_FORMATS = ("peft-loha", "peft-lokr", "lycoris")
PEFT_LOHA_DEFAULTS = {"r": 8, "alpha": 8}  # LoHaConfig / LoKrConfig defaults when a config leaves them out

_LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_STRUCTURED_KEY = re.compile(
    r"^(?P<name>.+?)\.(?P<part>" + "|".join(sorted(_LOHA_PARTS + _LOKR_PARTS, key=len, reverse=True))
    + r"|alpha|dora_scale)(?:\.(?P<adapter>[^.]+))??(?:\.weight)?$"
)


def structured_key_count(keys: list[str]) -> int:
    """How many keys are LoHa / LoKr factors (alpha tensors not counted)."""
    return sum(1 for k in keys if (m := _STRUCTURED_KEY.match(k)) and m["part"] not in ("alpha", "dora_scale"))


_LORA_FACTOR = re.compile(r"\.(?:lora_A|lora_B|lora_down|lora_up|lora_embedding_A|lora_embedding_B)(?:\.|$)")


def _lora_key_count(keys: list[str]) -> int:
    """How many keys are LoRA factors (PEFT's lora_A / lora_B, kohya's lora_down / lora_up)."""
    return sum(1 for k in keys if _LORA_FACTOR.search(k))


def parse_any(tf: TensorFile, config: dict | None, format: str | None = None,
              config_path: str | None = None) -> ParsedCheckpoint:
    """:func:`parse_checkpoint` for LoRA formats, :func:`parse_structured` for LoHa / LoKr (forced by ``format``, or
    detected: LoHa / LoKr factors outnumber LoRA factors, or the config's peft_type is LOHA / LOKR)."""
    if format in STRUCTURED_FORMATS:
        return parse_structured(tf, config, format, config_path)
    if format is None:
        keys = list(tf)
        count = structured_key_count(keys)
        peft_type = (config or {}).get("peft_type") if isinstance(config, dict) else None
        if count and (count >= _lora_key_count(keys) or peft_type in ("LOHA", "LOKR")):
            return parse_structured(tf, config, None, config_path)
    return parse_checkpoint(tf, config, format, config_path)


def _group(keys: list[str]) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    for key in keys:
        m = _STRUCTURED_KEY.match(key)
        if m:
            groups[m["name"]][m["part"]] = key
    return groups


def _shape_error(tf: TensorFile, name: str, shapes: dict[str, tuple[int, ...]], expected: str) -> RankscopeError:
    found = ", ".join(f"{part} {list(shape)}" for part, shape in shapes.items())
    return RankscopeError(f"{tf.path}: module {name!r} has {found}, which do not fit: expected {expected}")


def _read(tf: TensorFile, key: str) -> np.ndarray:
    return np.asarray(tf[key], dtype=np.float64)


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1)


def _tucker(t: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) of ``W[p, c, k] = Σ t[i, j, k] a[i, p] b[j, c]``: B = aᵀ (out, r), A (r, in·kh·kw), the core in A."""
    folded = np.einsum("ijk,jc->ick", t.reshape(t.shape[0], t.shape[1], -1), b)
    return a.T, folded.reshape(folded.shape[0], -1)


def _loha(tf: TensorFile, name: str, parts: dict[str, str]) -> tuple[dict, Callable[[], dict], int, int, int]:
    """(shapes, reader, r, out, in) of a LoHa module; checks that every part is there and the shapes chain."""
    need = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    tucker = "hada_t1" in parts or "hada_t2" in parts
    if tucker:
        need += ["hada_t1", "hada_t2"]
    missing = [p for p in need if p not in parts]
    if missing:
        raise RankscopeError(f"{tf.path}: LoHa module {name!r} has no {', '.join(missing)}: expected "
                             f"{', '.join(need)}")
    shapes = {p: tuple(tf.shape(parts[p])) for p in need}
    w1a, w1b, w2a, w2b = (shapes[p] for p in need[:4])
    if tucker:
        t1, t2 = shapes["hada_t1"], shapes["hada_t2"]
        r = w1a[0] if len(w1a) == 2 else -1
        ok = (all(len(s) == 2 for s in (w1a, w1b, w2a, w2b)) and len(t1) >= 3 and t1 == t2 and w1a == w2a
              and w1b == w2b and w1b[0] == r and t1[:2] == (r, r))
        if not ok:
            raise _shape_error(tf, name, shapes, "the Tucker layout hada_w1_a / hada_w2_a (r, out), hada_w1_b / "
                                                 "hada_w2_b (r, in), hada_t1 / hada_t2 (r, r, kh, kw), one r")
        out_features, in_features = w1a[1], w1b[1] * int(np.prod(t1[2:]))
    else:
        r = w1a[1] if len(w1a) == 2 else -1
        inner = [int(np.prod(s[1:])) for s in (w1b, w2b)]
        ok = (len(w1a) == 2 and len(w2a) == 2 and len(w1b) >= 2 and len(w2b) >= 2 and w1b[0] == r
              and w2a[1] == r and w2b[0] == r and w1a[0] == w2a[0] and inner[0] == inner[1])
        if not ok:
            raise _shape_error(tf, name, shapes, "hada_w1_a / hada_w2_a (out, r) and hada_w1_b / hada_w2_b (r, in), "
                                                 "the same r and out and in in both halves")
        out_features, in_features = w1a[0], inner[0]

    def read() -> dict[str, np.ndarray]:
        w = {p: _read(tf, parts[p]) for p in need}
        if tucker:
            B1, A1 = _tucker(w["hada_t1"], w["hada_w1_a"], w["hada_w1_b"])
            B2, A2 = _tucker(w["hada_t2"], w["hada_w2_a"], w["hada_w2_b"])
            return {"B1": B1, "A1": A1, "B2": B2, "A2": A2}
        return {"B1": w["hada_w1_a"], "A1": _flat(w["hada_w1_b"]), "B2": w["hada_w2_a"], "A2": _flat(w["hada_w2_b"])}

    flat = {"B1": (out_features, r), "A1": (r, in_features), "B2": (out_features, r), "A2": (r, in_features)}
    return flat, read, r, out_features, in_features


def _lokr(tf: TensorFile, name: str, parts: dict[str, str]) -> tuple[dict, Callable[[], dict], int | None, int, int]:
    """(shapes, reader, r or None when both halves are full, out, in) of a LoKr module, checked."""
    shapes = {p: tuple(tf.shape(parts[p])) for p in _LOKR_PARTS if p in parts}

    def fail(expected: str) -> RankscopeError:
        return _shape_error(tf, name, shapes, expected)

    if "lokr_w1" in parts:
        if len(shapes["lokr_w1"]) != 2:
            raise fail("lokr_w1 as a matrix (a, c)")
        w1 = shapes["lokr_w1"]
        r1 = None
    elif "lokr_w1_a" in parts and "lokr_w1_b" in parts:
        a, b = shapes["lokr_w1_a"], shapes["lokr_w1_b"]
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise fail("lokr_w1_a (a, r) and lokr_w1_b (r, c) with the same r")
        w1, r1 = (a[0], b[1]), a[1]
    else:
        raise RankscopeError(f"{tf.path}: LoKr module {name!r} has no lokr_w1 (nor both lokr_w1_a and lokr_w1_b): "
                             "expected its first Kronecker factor")
    tucker = "lokr_t2" in parts
    if "lokr_w2" in parts:
        w2 = shapes["lokr_w2"]
        if len(w2) < 2:
            raise fail("lokr_w2 as a matrix (b, d) or a kernel (b, d, kh, kw)")
        w2, r2 = (w2[0], int(np.prod(w2[1:]))), None
    elif "lokr_w2_a" in parts and "lokr_w2_b" in parts:
        a, b = shapes["lokr_w2_a"], shapes["lokr_w2_b"]
        if tucker:
            t = shapes["lokr_t2"]
            if len(a) != 2 or len(b) != 2 or a[0] != b[0] or len(t) < 3 or t[:2] != (a[0], a[0]):
                raise fail("the Tucker layout lokr_w2_a (r, b), lokr_w2_b (r, d), lokr_t2 (r, r, kh, kw)")
            w2, r2 = (a[1], b[1] * int(np.prod(t[2:]))), a[0]
        else:
            if len(a) != 2 or len(b) < 2 or a[1] != b[0]:
                raise fail("lokr_w2_a (b, r) and lokr_w2_b (r, d) with the same r")
            w2, r2 = (a[0], int(np.prod(b[1:]))), a[1]
    else:
        raise RankscopeError(f"{tf.path}: LoKr module {name!r} has no lokr_w2 (nor both lokr_w2_a and lokr_w2_b): "
                             "expected its second Kronecker factor")
    if r1 is not None and r2 is not None and r1 != r2:
        raise fail(f"one rank in both halves (lokr_w1_a/b have {r1}, lokr_w2_a/b {r2})")
    if 0 in w1 or 0 in w2:
        raise fail("factors with every dimension ≥ 1")

    def read() -> dict[str, np.ndarray]:
        w = {p: _read(tf, parts[p]) for p in shapes}
        out = {"W1": w["lokr_w1"]} if "lokr_w1" in w else {"B1": w["lokr_w1_a"], "A1": w["lokr_w1_b"]}
        if "lokr_w2" in w:
            out["W2"] = _flat(w["lokr_w2"])
        elif tucker:
            out["B2"], out["A2"] = _tucker(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
        else:
            out["B2"], out["A2"] = w["lokr_w2_a"], _flat(w["lokr_w2_b"])
        return out

    flat = {"W1": w1} if r1 is None else {"B1": (w1[0], r1), "A1": (r1, w1[1])}
    flat.update({"W2": w2} if r2 is None else {"B2": (w2[0], r2), "A2": (r2, w2[1])})
    return flat, read, (r1 if r1 is not None else r2), w1[0] * w2[0], w1[1] * w2[1]


def _kernel(tf: TensorFile, parts: dict[str, str]) -> list[int] | None:
    """A conv module's kernel size where a stored tensor keeps it (Tucker cores, a 4-D lokr_w2); None otherwise
    (linear, or a conv whose factors are stored flattened to (r, in·kh·kw))."""
    for part in ("hada_t1", "lokr_t2", "lokr_w2", "lokr_w2_b"):
        if part in parts and len(shape := tf.shape(parts[part])) > 2:
            return [int(d) for d in shape[2:]]
    return None


def rank_bound(method: str, shapes: dict[str, tuple[int, int]]) -> int:
    """The largest rank ΔW can have, from its 2-D factors' shapes (the number of singular values reported)."""
    if method == "loha":
        return min(shapes["B1"][1] * shapes["B2"][1], shapes["B1"][0], shapes["A1"][1])

    def half(which: str) -> int:
        if f"W{which}" in shapes:
            return min(shapes[f"W{which}"])
        return min(shapes[f"B{which}"][0], shapes[f"B{which}"][1], shapes[f"A{which}"][1])

    return half("1") * half("2")


def parse_structured(tf: TensorFile, config: dict | None, format: str | None = None,
                     config_path: str | None = None) -> ParsedCheckpoint:
    """Every LoHa / LoKr module of ``tf``, with its scale by the rules of PEFT (adapter_config.json) or LyCORIS
    (alpha tensors). Tensors that are neither (a LoCon or plain LoRA pair among them) are counted as skipped."""
    config_source = config_path or f"the adapter_config.json beside {tf.path}"
    if config is not None:
        check_adapter_config(config, config_source)
    keys = list(tf)
    groups = _group(keys)
    peft_type = (config or {}).get("peft_type")
    is_peft = format in ("peft-loha", "peft-lokr") or (format is None and (
        peft_type in ("LOHA", "LOKR") or not any("alpha" in parts for parts in groups.values())))
    patterns = ConfigPatterns(config or {}, config_source)
    notes: set[str] = set()
    modules: list[LoraModule] = []
    claimed: set[str] = set()
    methods = set()
    for name, parts in groups.items():
        factors = {p for p in parts if p not in ("alpha", "dora_scale")}
        if not factors:
            continue  # an alpha alone (a LoCon module's, say): skipped
        if factors & set(_LOHA_PARTS) and factors & set(_LOKR_PARTS):
            raise RankscopeError(f"{tf.path}: module {name!r} has both LoHa (hada_) and LoKr (lokr_) factors: "
                                 "expected one method per module")
        method = "loha" if factors & set(_LOHA_PARTS) else "lokr"
        empty = [f"{p} {list(tf.shape(parts[p]))}" for p in sorted(factors) if 0 in tuple(tf.shape(parts[p]))]
        if empty:
            raise RankscopeError(f"{tf.path}: {method} module {name!r} has an empty factor ({', '.join(empty)}): "
                                 "expected every dimension ≥ 1")
        flat, read, r, out_features, in_features = (_loha if method == "loha" else _lokr)(tf, name, parts)
        for part in factors:
            check_float_tensor(tf, parts[part], name)
        if is_peft:
            scale = _peft_scale(config, name, r, notes, patterns)
            source = "adapter_config.json" if config is not None else "assumed 1: no adapter_config.json"
        else:
            scale = _lycoris_scale(tf, parts, name, r)
            source = "alpha tensor" if "alpha" in parts else "assumed 1: no alpha stored"
        conv = any(len(tf.shape(parts[p])) > 2 for p in factors)
        first = parts.get("hada_w1_a") or parts.get("lokr_w1") or parts.get("lokr_w1_a")
        structure = {"method": method, "r": r, "factors": {k: list(v) for k, v in flat.items()},
                     "kernel": _kernel(tf, parts),
                     "params": int(sum(np.prod(tf.shape(parts[p])) for p in factors)),
                     "tucker": any(p in parts for p in ("hada_t1", "lokr_t2"))}
        modules.append(LoraModule(
            name=name, rank=rank_bound(method, flat), scale=scale, scale_source=source, in_features=in_features,
            out_features=out_features, stored_dtype=tf.dtype(first), layer_type="conv" if conv else "linear",
            dora="dora_scale" in parts, keys=dict(parts), method=method, structure=structure, _read_parts=read))
        claimed.update(parts.values())
        methods.add(method)
        if "dora_scale" in parts:
            notes.add("DoRA-style weight decomposition (dora_scale): the applied update also rescales each output, "
                      "so ΔW is not the LoHa / LoKr product alone; rankscope reports the product's spectrum")
    if not modules:
        raise RankscopeError(f"{tf.path} holds {len(keys)} tensors but no complete LoHa or LoKr module: expected "
                             "hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (LoHa) or lokr_w1 and lokr_w2 (LoKr) per module")
    notes.add("LoHa / LoKr modules: the spectral view is exact (through the structure); the per-rank view (slot norms) "
              "is undefined for them, as their update has no B·A slots; rank is the largest rank ΔW can have")
    if is_peft:
        fmt = "peft-loha" if (peft_type == "LOHA" or methods == {"loha"}) and peft_type != "LOKR" else "peft-lokr"
    else:
        fmt = "lycoris"
    return ParsedCheckpoint(fmt, modules, [k for k in keys if k not in claimed], sorted(notes))


def _peft_scale(config: dict | None, name: str, r: int | None, notes: set[str], patterns: ConfigPatterns) -> float:
    """PEFT LoHa / LoKr: ``alpha / r`` of the module's (pattern-matched) config entries."""
    if config is None:
        notes.add("no adapter_config.json beside the weights: scale taken as 1")
        return 1.0
    bare = name.removeprefix("base_model.model.")
    rank = patterns.value("rank_pattern", bare, config.get("r", PEFT_LOHA_DEFAULTS["r"]))
    alpha = patterns.value("alpha_pattern", bare, config.get("alpha", PEFT_LOHA_DEFAULTS["alpha"]))
    for key in ("r", "alpha"):
        if key not in config:
            notes.add(f"adapter_config.json has no {key!r}: PEFT's default {PEFT_LOHA_DEFAULTS[key]} is used")
    if r is not None and rank != r:
        notes.add(f"adapter_config.json gives r {rank} for some modules whose factors have rank {r}; the config's r "
                  "is used for the scale, as PEFT does")
    if not rank:
        raise RankscopeError(f"adapter_config.json: r is {rank!r} for module {name!r}, expected an integer ≥ 1")
    return float(alpha) / float(rank)


def _lycoris_scale(tf: TensorFile, parts: dict[str, str], name: str, r: int | None) -> float:
    """LyCORIS: ``alpha / r``; 1 without an alpha, with alpha 0, or for a LoKr with both halves full."""
    if "alpha" not in parts or r is None:
        return 1.0
    alpha = float(per_rank_vector(tf, parts["alpha"], 1, name, "the alpha")[0])
    return alpha / r if alpha else 1.0
