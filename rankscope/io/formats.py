"""Turning the tensors of one checkpoint file into LoRA modules, for every format users bring.

Each format is a key pattern that names the module and the part (A, B, alpha, ...), plus the
rule for the scale of ``ΔW = scale · B A``. A is always returned as (r, in) and B as (out, r),
whatever the stored layout (mlx-lm stores both transposed; conv LoRA is flattened).
Tensors that are not LoRA parts (a ``classifier`` head from ``modules_to_save``) are skipped
and counted, never paired.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from rankscope.errors import RankscopeError
from rankscope.io.patterns import PatternError, PatternMap, PatternTooSlow, pattern_map
from rankscope.io.tensors import TensorFile
from rankscope.io.validate import check_adapter_config, check_temperature, describe, is_number, parse_json

FORMATS = ("peft", "kohya", "diffusers-legacy", "diffusers-peft", "mlx", "torchtune", "gguf")

# Names of the parts: "A", "B" (the pair), and extras that change the scale or the update.
_PEFT_KEY = re.compile(
    r"^(?P<name>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_E|"
    r"lora_magnitude_vector|lora_gate|ranknum)(?:\.(?P<adapter>[^.]+))??(?:\.(?P<param>weight|bias))?$"
)
_KOHYA_KEY = re.compile(r"^(?P<name>(?:lora_(?:unet|te\d?)|lycoris)_.+?)\.(?P<part>lora_down|lora_up|lora_mid|alpha|dora_scale)"
                        r"(?:\.weight)?$")
_DIFFUSERS_LEGACY_KEY = re.compile(r"^(?P<name>.+?)(?:_lora|\.lora_linear_layer|\.lora)\.(?P<part>down|up|alpha)(?:\.weight)?$")
_MLX_KEY = re.compile(r"^(?P<name>.+)\.(?P<part>lora_a|lora_b|m)$")
_TORCHTUNE_KEY = re.compile(r"^(?P<name>.+)\.(?P<part>lora_a|lora_b|magnitude)\.weight$")

_PART_ROLES = {
    "lora_A": "A", "lora_embedding_A": "A", "lora_down": "A", "down": "A", "lora_a": "A",
    "lora_B": "B", "lora_embedding_B": "B", "lora_up": "B", "up": "B", "lora_b": "B",
    "lora_E": "E", "alpha": "alpha", "lora_mid": "mid", "lora_gate": "gate", "ranknum": "ranknum",
    "lora_magnitude_vector": "magnitude", "dora_scale": "magnitude", "m": "magnitude", "magnitude": "magnitude",
}
_DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.", "prior.")
_LAST_INTEGER = re.compile(r"(?:^|[._])(\d+)(?=[._]|$)")
PEFT_DEFAULT_ALPHA = 8  # LoraConfig.lora_alpha when a config leaves it out


@dataclass
class LoraModule:
    """One adapted module: ``ΔW = scale · B diag(c) A`` with c from AdaLoRA's E or BeamLoRA's w.

    ``A`` (r, in) and ``B`` (out, r) are read from the file when asked for (never cached),
    so a checkpoint larger than memory can be walked one module at a time.
    """

    name: str
    rank: int
    scale: float
    in_features: int
    out_features: int
    stored_dtype: str
    layer_type: str = "linear"  # "linear", "conv" or "embedding"
    dora: bool = False
    E: np.ndarray | None = None  # AdaLoRA singular values, (r,)
    rank_weights: np.ndarray | None = None  # BeamLoRA w stored beside A (not folded in)
    scores: np.ndarray | None = None  # BeamLoRA raw scores, kept for analysis (w already folded)
    keys: dict[str, str] = field(default_factory=dict)  # role ("A", "B", "alpha", "E", ...) -> tensor name
    _read_A: Callable[[], np.ndarray] = field(default=None, repr=False)
    _read_B: Callable[[], np.ndarray] = field(default=None, repr=False)
    # LoHa / LoKr (rankscope.io.structured): ΔW is built from other factors than one B A, read by _read_parts;
    # rank is then the largest rank ΔW can have, and structure says what was stored.
    method: str = "lora"  # "lora", "loha" or "lokr"
    structure: dict[str, Any] | None = None
    _read_parts: Callable[[], dict[str, np.ndarray]] = field(default=None, repr=False)

    @property
    def A(self) -> np.ndarray:
        if self._read_A is None:
            raise RankscopeError(f"{self.name} is a {self.method} module: its update has no A/B factors to read")
        return self._read_A()

    @property
    def B(self) -> np.ndarray:
        if self._read_B is None:
            raise RankscopeError(f"{self.name} is a {self.method} module: its update has no A/B factors to read")
        return self._read_B()

    @property
    def parts(self) -> dict[str, np.ndarray]:
        """A LoHa / LoKr module's 2-D factors (see :mod:`rankscope.maths.structured`)."""
        return self._read_parts()

    @property
    def coefficients(self) -> np.ndarray | None:
        """Per-rank multipliers between B and A (AdaLoRA's E times BeamLoRA's w), or None."""
        c = None
        for extra in (self.E, self.rank_weights):
            if extra is not None:
                c = extra if c is None else c * extra
        return c

    @property
    def layer(self) -> str:
        """The name up to its last integer component (``model.layers.3``), or '' if none."""
        match = None
        for match in _LAST_INTEGER.finditer(self.name):
            pass
        return self.name[: match.end()] if match else ""

    @property
    def kind(self) -> str:
        """What the module is within its layer (``self_attn.q_proj``, ``attention.self.query``)."""
        layer = self.layer
        return self.name[len(layer) + 1 :] if layer else self.name.rsplit(".", 1)[-1]

    @property
    def layer_index(self) -> int | None:
        layer = self.layer
        return int(_LAST_INTEGER.findall(layer)[-1]) if layer else None


@dataclass
class ParsedCheckpoint:
    format: str
    modules: list[LoraModule]
    skipped: list[str]  # tensors that are not LoRA parts
    notes: list[str]  # things a reader must know (DoRA, assumed scales, ...)


def _match_keys(keys: list[str], pattern: re.Pattern) -> dict[str, dict[str, str]]:
    """Group keys by module: {module name: {role: key}}."""
    matches = [m.groupdict() | {"key": m.string} for m in map(pattern.match, keys) if m]
    # A raw model state dict names the adapter (lora_A.default.weight); with one adapter it adds nothing.
    several_adapters = len({gd.get("adapter") for gd in matches}) > 1
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    for gd in matches:
        role = _PART_ROLES[gd["part"]] + ("_bias" if gd.get("param") == "bias" else "")
        name = f"{gd['name']}[{gd['adapter']}]" if several_adapters and gd.get("adapter") else gd["name"]
        groups[name][role] = gd["key"]
    return groups


def detect_format(keys: list[str], config: dict | None) -> str:
    """Pick the format whose key pattern claims the most tensors (config breaks PEFT ties)."""
    counts = {
        "peft": sum(1 for k in keys if _PEFT_KEY.match(k)),
        "kohya": sum(1 for k in keys if _KOHYA_KEY.match(k)),
        "diffusers-legacy": sum(1 for k in keys if _DIFFUSERS_LEGACY_KEY.match(k)),
        "mlx": sum(1 for k in keys if _MLX_KEY.match(k) and not k.endswith(".m")),
        "torchtune": sum(1 for k in keys if _TORCHTUNE_KEY.match(k)),
    }
    best = max(counts, key=counts.get)
    if counts[best] == 0:
        return "unknown"
    if best == "peft":
        lora_keys = [k for k in keys if _PEFT_KEY.match(k)]
        if not (config and "peft_type" in config) and all(k.startswith(_DIFFUSERS_PREFIXES) for k in lora_keys):
            return "diffusers-peft"
    return best


class _Patterns:
    """A config's rank_pattern and alpha_pattern, each indexed once per checkpoint (not once per module)."""

    def __init__(self, config: dict, source: str):
        self.config, self.source = config, source
        self.maps = {field: pattern_map(config.get(field)) for field in ("rank_pattern", "alpha_pattern")}

    def value(self, field: str, name: str, default: Any) -> Any:
        """PEFT's own rule (``peft.utils.other.get_pattern_key``): the first key, in order, that matches a name
        ending in '.' + key; matched in bounded time (:mod:`rankscope.io.patterns`), a key past the bound refused."""
        return _pattern_value(self.config.get(field) or {}, self.maps[field], field, name, default, self.source)


ConfigPatterns = _Patterns  # the same rule for PEFT's LoHa / LoKr configs (rankscope.io.structured)


def _pattern_value(patterns: dict, keys: PatternMap, field: str, name: str, default: Any, source: str) -> Any:
    if not patterns:
        return default
    try:
        index = keys.lookup(name)
        return default if index is None else patterns[keys.keys[index]]
    except PatternTooSlow as e:
        key = e.key if len(e.key) <= 40 else e.key[:37] + "..."
        raise RankscopeError(f"{source}: {field} key {key!r} {e.describe()}: expected regular expressions that "
                             "match module names in bounded time (rankscope refuses the key rather than hang)") from None
    except PatternError as e:
        raise RankscopeError(f"{source}: {field} key {e.key!r} is refused: expected {e.reason}") from None


def _peft_scale(config: dict, module_name: str, rank: int, notes: set[str], patterns: _Patterns) -> float:
    bare = module_name.split("[", 1)[0].removeprefix("base_model.model.")
    r = patterns.value("rank_pattern", bare, config.get("r", rank))
    if "r" not in config:
        notes.add("adapter_config.json has no \"r\": each module's rank is read from its tensors")
    if "lora_alpha" not in config:
        notes.add(f"adapter_config.json has no \"lora_alpha\": PEFT's default {PEFT_DEFAULT_ALPHA} is used")
    alpha = patterns.value("alpha_pattern", bare, config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    if isinstance(r, int) and r != rank:
        notes.add(f"adapter_config.json gives rank {r} for some modules whose tensors have rank {rank}; the tensors' rank is used")
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _oriented(tf: TensorFile, key: str, transpose: bool, flatten: bool) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        array = tf[key]
        if flatten and array.ndim > 2:
            array = array.reshape(array.shape[0], -1)  # conv (r, in, kh, kw) -> (r, in*kh*kw)
        return array.T if transpose else array

    return read


def parse_checkpoint(tf: TensorFile, config: dict | None, format: str | None = None,
                     config_path: str | None = None) -> ParsedCheckpoint:
    """Find every LoRA module in ``tf``. ``config`` is the adapter_config.json beside it (read from
    ``config_path``), if any; its fields are checked here, so a bad one is reported, not guessed around.

    Modules of rank 0 (empty A and B) are skipped with a note: they hold no update to analyse.
    """
    config_source = config_path or f"the adapter_config.json beside {tf.path}"
    if config is not None:
        check_adapter_config(config, config_source)
    keys = list(tf)
    fmt = format or detect_format(keys, config)
    if fmt == "unknown":
        sample = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        raise RankscopeError(
            f"{tf.path} holds {len(keys)} tensors ({sample}) but no LoRA pairs: expected keys such as "
            "'<module>.lora_A.weight' / '<module>.lora_B.weight' (PEFT), '.lora_down' / '.lora_up' (kohya), "
            "'.lora_a' / '.lora_b' (mlx-lm, torchtune)"
        )
    if fmt not in FORMATS:
        raise RankscopeError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "gguf":  # read by rankscope.io.gguf_lora, from .gguf files only
        raise RankscopeError(f"{tf.path} is not a GGUF file: --format gguf reads llama.cpp's .gguf LoRA adapters")
    pattern = {
        "peft": _PEFT_KEY, "diffusers-peft": _PEFT_KEY, "kohya": _KOHYA_KEY,
        "diffusers-legacy": _DIFFUSERS_LEGACY_KEY, "mlx": _MLX_KEY, "torchtune": _TORCHTUNE_KEY,
    }[fmt]
    has_config = config is not None
    config = config or {}
    adalora = config.get("peft_type") == "ADALORA" or any(k.endswith("lora_E") or ".lora_E." in k for k in keys)
    patterns = _Patterns(config, config_source)
    groups = _match_keys(keys, pattern)
    notes: set[str] = set()
    modules: list[LoraModule] = []
    claimed: set[str] = set()
    empty: list[str] = []
    for name, parts in groups.items():
        if "A" not in parts or "B" not in parts:
            continue  # an orphan; counted with the skipped tensors below
        a_shape, b_shape = tf.shape(parts["A"]), tf.shape(parts["B"])
        transpose = fmt == "mlx"
        if transpose:  # mlx-lm: lora_a (in, r), lora_b (r, out)
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0]:
                raise RankscopeError(
                    f"{tf.path}: module {name!r} has lora_a {list(a_shape)} and lora_b {list(b_shape)}, "
                    "which do not chain: expected mlx-lm's (in, r) and (r, out)"
                )
            rank, in_features, out_features = a_shape[1], a_shape[0], b_shape[1]
        else:
            if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[0] != b_shape[1] or any(d != 1 for d in b_shape[2:]):
                raise RankscopeError(
                    f"{tf.path}: module {name!r} has A {list(a_shape)} and B {list(b_shape)}, which do not chain: "
                    "expected A (r, in) and B (out, r) with the same r"
                )
            rank, out_features = a_shape[0], b_shape[0]
            in_features = int(np.prod(a_shape[1:]))
            if "mid" in parts:  # LyCORIS LoCon with a Tucker core: folded into A (a plain conv LoRA then)
                in_features = _tucker_in_features(tf, parts, name, a_shape)
        if rank == 0:
            empty.append(name)  # its tensors stay unclaimed: counted with the skipped ones
            continue
        if in_features == 0 or out_features == 0:
            which = "A" if in_features == 0 else "B"
            raise RankscopeError(
                f"{tf.path}: module {name!r} has rank {rank} but an empty factor: A {list(a_shape)} and B "
                f"{list(b_shape)} ({'in' if which == 'A' else 'out'}_features 0): expected A (r, in) and B (out, r) "
                "with r, in and out all ≥ 1"
            )
        for role in ("A", "B"):
            check_float_tensor(tf, parts[role], name)
        claimed.update(parts.values())
        if "mid" in parts:
            check_float_tensor(tf, parts["mid"], name)
            notes.add("LoCon modules with a Tucker core (lora_mid): the core is folded into lora_down, "
                      "so each is an exact conv LoRA (A flattened to (r, in·kh·kw))")
        layer_type = "conv" if len(a_shape) > 2 else "embedding" if "lora_embedding_A" in parts["A"] else "linear"
        module = LoraModule(
            name=name, rank=rank, scale=1.0, in_features=in_features, out_features=out_features,
            stored_dtype=tf.dtype(parts["A"]), layer_type=layer_type, dora="magnitude" in parts,
            _read_A=_tucker_down(tf, parts) if "mid" in parts else _oriented(tf, parts["A"], transpose, flatten=True),
            _read_B=_oriented(tf, parts["B"], transpose, flatten=True), keys=dict(parts),
        )
        if "B_bias" in parts:
            notes.add("some lora_B layers carry a bias (lora_bias=True): ΔW is reported without it")
        if module.dora:
            notes.add("DoRA adapter: its update also rescales each output by a learned magnitude, "
                      "so ΔW is not B A alone; rankscope reports the importances of B A")
        module.scale = _module_scale(fmt, tf, parts, config, has_config, name, rank, adalora, notes, patterns)
        if "E" in parts:
            module.E = per_rank_vector(tf, parts["E"], rank, name, "AdaLoRA's singular values lora_E")
        if "gate" in parts:
            gate = per_rank_vector(tf, parts["gate"], rank, name, "BeamLoRA's gates lora_gate")
            temperature = check_temperature(config, config_source)
            z = gate / temperature
            module.rank_weights = rank * np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            notes.add(f"BeamLoRA gates stored beside A: w = r·softmax(gate/T) with T = {temperature} multiplies each rank")
        modules.append(module)
    if empty:
        notes.add(f"{len(empty)} module(s) have rank 0 (empty A and B, no update) and are skipped: "
                  + ", ".join(empty[:3]) + (", ..." if len(empty) > 3 else ""))
    if not modules and empty:
        raise RankscopeError(f"{tf.path}: every LoRA module has rank 0 ({len(empty)} of them, e.g. {empty[0]!r}): "
                             "expected A (r, in) and B (out, r) with r ≥ 1")
    if not modules:
        raise RankscopeError(
            f"{tf.path} holds {len(keys)} tensors but no complete LoRA pair for format {fmt}: "
            "expected each module to have both its A (down) and B (up) matrix"
        )
    skipped = [k for k in keys if k not in claimed]
    return ParsedCheckpoint(fmt, modules, skipped, sorted(notes))


def _tucker_in_features(tf: TensorFile, parts: dict[str, str], name: str, a_shape: tuple[int, ...]) -> int:
    """in·kh·kw of a LoCon module with lora_down (r, in, 1, 1) and lora_mid (r, r, kh, kw); checks the shapes."""
    mid = tf.shape(parts["mid"])
    r = a_shape[0]
    if len(a_shape) != 4 or any(d != 1 for d in a_shape[2:]) or len(mid) != 4 or tuple(mid[:2]) != (r, r):
        raise RankscopeError(f"{tf.path}: module {name!r} has lora_down {list(a_shape)} and lora_mid {list(mid)}: "
                             "expected LyCORIS's Tucker layout, lora_down (r, in, 1, 1) and lora_mid (r, r, kh, kw)")
    return int(a_shape[1] * mid[2] * mid[3])


def _tucker_down(tf: TensorFile, parts: dict[str, str]) -> Callable[[], np.ndarray]:
    """A (r, in·kh·kw) of a LoCon module: ``A[a, (i, k)] = Σ_b mid[a, b, k] · down[b, i]`` (the 1×1 down conv, then
    the kh×kw mid conv, composed into one kernel)."""

    def read() -> np.ndarray:
        down = np.asarray(tf[parts["A"]], dtype=np.float64)
        mid = np.asarray(tf[parts["mid"]], dtype=np.float64)
        down = down.reshape(down.shape[0], down.shape[1])
        folded = np.einsum("abk,bi->aik", mid.reshape(mid.shape[0], mid.shape[1], -1), down)
        return folded.reshape(folded.shape[0], -1)

    return read


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_REAL_DTYPES = (*FLOAT_DTYPES, "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")


def check_float_tensor(tf: TensorFile, key: str, module: str) -> None:
    """A LoRA factor must be stored in a floating dtype: integers, bool, complex, fp8 or a quantised, sparse or
    meta tensor would be analysed as numbers they are not (or not read at all)."""
    dtype = tf.dtype(key)
    if dtype not in FLOAT_DTYPES:
        raise RankscopeError(f"{tf.path}: module {module!r}: tensor {key!r} has dtype {dtype}, expected a dense "
                             f"floating tensor ({', '.join(FLOAT_DTYPES[:-1])} or {FLOAT_DTYPES[-1]}) for a LoRA factor")


def _real_values(tf: TensorFile, key: str, module: str, what: str) -> np.ndarray:
    """A stored scale or per-rank vector as float64: floating or integer dtypes (never bool, complex, fp8, ...)."""
    dtype = tf.dtype(key)
    if dtype not in _REAL_DTYPES:
        raise RankscopeError(f"{tf.path}: {what} of module {module!r} (tensor {key!r}) has dtype {dtype}, expected a "
                             f"real number dtype ({', '.join(FLOAT_DTYPES)} or an integer one)")
    return np.asarray(tf[key], dtype=np.float64)


def per_rank_vector(tf: TensorFile, key: str, rank: int, module: str, what: str) -> np.ndarray:
    """A stored vector with one value per rank (AdaLoRA's E, BeamLoRA's gate or scores), as float64."""
    values = _real_values(tf, key, module, what).reshape(-1)
    if values.size != rank:
        tensor = f" (tensor {key!r})" if key != module else ""
        raise RankscopeError(f"{tf.path}: {what} of module {module!r}{tensor} hold {values.size} values, "
                             f"expected one per rank ({rank})")
    return values


def _kohya_alpha(tf: TensorFile, key: str, module: str) -> float:
    alpha = _real_values(tf, key, module, "the alpha")
    if alpha.size != 1:
        raise RankscopeError(f"{tf.path}: tensor {key!r} has shape {list(alpha.shape)}, expected a single number "
                             "(the module's alpha)")
    return float(alpha.reshape(-1)[0])


def _metadata_number(tf: TensorFile, key: str) -> float | None:
    """A number stored as a string in the safetensors metadata (kohya's ss_network_alpha), or None."""
    raw = tf.metadata.get(key)
    if raw is None or raw.strip() in ("", "None", "null"):
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise RankscopeError(f"{tf.path}: metadata {key} is {describe(raw)}, expected a finite number")
    return value


def _module_scale(fmt: str, tf: TensorFile, parts: dict[str, str], config: dict, has_config: bool, name: str,
                  rank: int, adalora: bool, notes: set[str], patterns: _Patterns) -> float:
    """The scale of ΔW = scale · B A for one module, by the rules of its format."""
    if "alpha" in parts:  # kohya, and diffusers files converted from kohya
        alpha = _kohya_alpha(tf, parts["alpha"], name)
        return alpha / rank if alpha else 1.0
    if adalora:
        # PEFT AdaLoRA: output * scaling / (ranknum + 1e-5), scaling = lora_alpha (or r when alpha is 0).
        alpha = config.get("lora_alpha") or rank
        return alpha / (rank + 1e-5)
    if fmt in ("peft", "torchtune") and has_config:
        return _peft_scale(config, name, rank, notes, patterns)
    if fmt == "kohya":
        alpha = _metadata_number(tf, "ss_network_alpha") or 0
        return alpha / rank if alpha else 1.0
    if fmt == "mlx":
        params = config.get("lora_parameters") or {}
        if "scale" in params:
            return float(params["scale"])
        if "alpha" in params:
            notes.add("mlx-lm config has alpha but no scale: scale taken as alpha / rank")
            return float(params["alpha"]) / rank
        notes.add("no mlx-lm lora_parameters.scale found: assumed mlx-lm's default scale 20.0")
        return 20.0
    if fmt == "diffusers-peft":
        alphas = _diffusers_metadata_alphas(tf)
        if alphas:
            for prefix, (r, alpha) in alphas.items():
                if not prefix or name.startswith(prefix + "."):
                    return alpha / rank
        return 1.0
    if fmt in ("peft", "torchtune"):
        notes.add("no adapter_config.json beside the weights: scale taken as 1")
    return 1.0


def _diffusers_metadata_alphas(tf: TensorFile) -> dict[str, tuple[int, float]]:
    """Diffusers writes each component's LoraConfig into ``lora_adapter_metadata`` (when saved)."""
    raw = tf.metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    source = f"{tf.path} (metadata lora_adapter_metadata)"
    meta = parse_json(raw, source, "a JSON object of LoRA configs")
    if not isinstance(meta, dict):
        raise RankscopeError(f"{source} is {describe(meta)}, expected a JSON object of LoRA configs")

    def alpha_of(config: dict, where: str) -> float:
        alpha = config["lora_alpha"]
        if not (is_number(alpha) and math.isfinite(alpha)):
            raise RankscopeError(f"{source}: {where}lora_alpha is {describe(alpha)}, expected a number")
        return float(alpha)

    out = {}
    for key, value in meta.items():
        if isinstance(value, dict) and "lora_alpha" in value:
            out[key] = (value.get("r"), alpha_of(value, f"{key}."))
    if not out and "lora_alpha" in meta:  # a single flat config
        return {"": (meta.get("r"), alpha_of(meta, ""))}
    return out
