"""Hugging Face Hub ids wherever a path is taken: ``owner/name[@revision][/sub/folder]`` → a folder in the Hub cache.

A local path always wins over a repo id of the same spelling. For an adapter only its own files are fetched
(``adapter_config.json`` and the weights at the chosen subfolder, and those of ``checkpoint-N/`` snapshots below
it), never a base model's weights; for a base model (``--model``) the model's files at that level. Everything goes
through ``huggingface_hub``, which reads ``HF_HUB_OFFLINE``, ``HF_TOKEN``, ``HF_ENDPOINT`` and ``HF_HOME`` /
``HF_HUB_CACHE`` itself, and fills the normal Hub cache. ``huggingface_hub`` is imported only when a repo id is
resolved, so a local path costs nothing.
"""

from __future__ import annotations

import functools
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

from rankscope.constants import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHT_NAMES,
    EVENTS_FILE,
    NOT_ADAPTER_FILES,
    RUN_CONFIG,
    SCORES_FILE,
    TRACE_FILE,
    TRAINER_STATE,
)
from rankscope.errors import RankscopeError

ADAPTER = "adapter"
MODEL = "model"

# owner/name, then @revision (no slash: a revision with one, such as refs/pr/1, goes in --revision), then a subfolder.
_SPEC = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>[^/@\s]+))?(?:/(?P<sub>[^@\s]*))?")
# Beside an adapter's weights: what the readers use (its config, BeamLoRA scores, the Trainer's step).
_ADAPTER_SIDECARS = (ADAPTER_CONFIG, SCORES_FILE, TRAINER_STATE)
# At the top of a run folder: the run's config, rank trace and operations.
_RUN_FILES = (RUN_CONFIG, TRACE_FILE, EVENTS_FILE)
# Snapshot folders of a run, as rankscope.io.loading names them (checkpoint-N, step-N, global_stepN), and its final/.
_SNAPSHOT_FOLDER = re.compile(r"(?:checkpoint-|(?:global_)?step[-_]?)\d+|final")
_MLX_SNAPSHOT = re.compile(r"\d+_adapters\.(?:safetensors|npz)")  # mlx-lm's 0000100_adapters.safetensors
_TENSOR_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
# A base model's weights, by the names transformers, diffusers and the original releases give them: never an adapter.
_BASE_WEIGHTS = re.compile(r"(?:model|pytorch_model|diffusion_pytorch_model|tf_model|flax_model|consolidated|"
                           r"model\.fp16)(?:[-.].*)?\.(?:safetensors|bin|pt|pth|ckpt|h5|msgpack)", re.IGNORECASE)
# A base model fetched for --model: its config, tokenizer and weights in one format (safetensors, else .bin).
_OTHER_FORMATS = (".gguf", ".onnx", ".onnx_data", ".h5", ".msgpack", ".ot", ".tflite", ".mlmodel", ".pt", ".pth",
                  ".ckpt", ".npz", ".nemo")


@dataclass(frozen=True)
class HubSpec:
    """A repo on the Hub, the revision asked for (None: the default branch) and a subfolder ('' for the root)."""

    repo_id: str
    revision: str | None
    subfolder: str

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (f"/{self.subfolder}" if self.subfolder else "")


def parse_spec(spec: str | os.PathLike, revision: str | None = None) -> HubSpec | None:
    """``owner/name[@rev][/sub/dir]`` as a :class:`HubSpec`, or None where ``spec`` cannot be a repo id.

    ``revision`` (``--revision``) applies where the spec names none; both, and different, is an error.
    """
    text = os.fspath(spec).strip()
    m = _SPEC.fullmatch(text)
    if m is None or "--" in m["repo"] or ".." in m["repo"] or m["repo"].endswith((".", "-")):
        return None
    parts = [p for p in (m["sub"] or "").split("/") if p]
    if any(p in (".", "..") for p in parts):
        return None
    if revision is not None and m["revision"] is not None and revision != m["revision"]:
        raise RankscopeError(f"{text} names revision {m['revision']!r} and --revision is {revision!r}: expected one "
                             "revision (drop one of them)")
    return HubSpec(m["repo"], m["revision"] or revision, "/".join(parts))


def is_hub_spec(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` is not a local path and reads as a Hub repo id (``owner/name[@rev][/sub]``)."""
    return not os.path.lexists(os.path.expanduser(os.fspath(spec).strip())) and parse_spec(spec) is not None


def resolve_local(spec: str | os.PathLike, revision: str | None = None, what: str = ADAPTER) -> Path:
    """The local path for ``spec``: itself where it exists (or cannot be a repo id), else the repo's folder in the
    Hugging Face cache, fetching the files ``what`` (``"adapter"`` or ``"model"``) needs that are not cached yet."""
    text = os.fspath(spec)
    if os.path.lexists(os.path.expanduser(text.strip())):
        return Path(spec)  # a local path always wins over a repo id of the same spelling
    hub = parse_spec(text, revision)
    if hub is None:
        return Path(spec)  # the loader says why it cannot be read
    return _fetch(hub, what)


# ----------------------------------------------------------------------------- which files


def _level(listing: Iterable[str], prefix: str) -> tuple[list[str], dict[str, list[str]]]:
    """(file names directly under ``prefix``, {subfolder: its file names}) of a repo's file listing."""
    files: list[str] = []
    folders: dict[str, list[str]] = {}
    for path in listing:
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):].split("/")
        if len(rest) == 1:
            files.append(rest[0])
        elif len(rest) == 2:
            folders.setdefault(rest[0], []).append(rest[1])
    return sorted(files), folders


def _adapter_weights(names: list[str]) -> list[str]:
    """The adapter weights among a folder's file names: the first known adapter name, else every tensor file that
    is no base model's and no training state (a ``.gguf`` only when its name says lora or adapter)."""
    present = set(names)
    for known in ADAPTER_WEIGHT_NAMES:
        if known in present:  # with mlx-lm's snapshots beside its adapters.safetensors, if any
            return [known] + [n for n in names if _MLX_SNAPSHOT.fullmatch(n)]
    return [n for n in names
            if n.lower().endswith(_TENSOR_SUFFIXES) and n not in NOT_ADAPTER_FILES and not n.startswith(".")
            and not _BASE_WEIGHTS.fullmatch(n)
            and (not n.lower().endswith(".gguf") or re.search(r"lora|adapter", n, re.IGNORECASE))]


def _folder_files(names: list[str], prefix: str) -> list[str]:
    weights = _adapter_weights(names)
    if not weights:
        return []
    return [prefix + n for n in weights] + [prefix + n for n in _ADAPTER_SIDECARS if n in names]


def adapter_files(listing: Iterable[str], subfolder: str = "") -> list[str]:
    """The files of a repo listing that an adapter at ``subfolder`` needs: its weights and sidecars there, those of
    snapshot folders (``checkpoint-N/``) just below, and a run's own files; never a base model's weights.

    ``subfolder`` may name one weights file. An empty list: no adapter there.
    """
    listing = list(listing)
    if subfolder and subfolder in listing:  # one file, named in full
        parent = str(PurePosixPath(subfolder).parent)
        prefix = "" if parent == "." else parent + "/"
        here, _ = _level(listing, prefix)
        return [subfolder] + [prefix + n for n in _ADAPTER_SIDECARS if n in here]
    prefix = subfolder.strip("/") + "/" if subfolder.strip("/") else ""
    here, folders = _level(listing, prefix)
    chosen = _folder_files(here, prefix)
    snapshots = [path for folder in sorted(folders) if _SNAPSHOT_FOLDER.fullmatch(folder)
                 for path in _folder_files(folders[folder], f"{prefix}{folder}/")]
    if snapshots or (chosen and any(n in here for n in (TRACE_FILE, EVENTS_FILE))):  # a run: its own files too
        chosen += snapshots + [prefix + n for n in _RUN_FILES if n in here]
    return chosen


def model_files(listing: Iterable[str], subfolder: str = "") -> list[str]:
    """The files of a repo listing that ``from_pretrained`` reads for a model at ``subfolder``: everything at that
    level but weights in other formats (GGUF, ONNX, TF, Flax, ``.pt``), and ``.bin`` weights where safetensors exist."""
    prefix = subfolder.strip("/") + "/" if subfolder.strip("/") else ""
    here, _ = _level(listing, prefix)
    has_safetensors = any(n.endswith(".safetensors") for n in here)
    return [prefix + n for n in here
            if not n.lower().endswith(_OTHER_FORMATS) and not (has_safetensors and n.endswith(".bin"))
            and not n.startswith(".")]


# ----------------------------------------------------------------------------- fetching


def _no_files(hub: HubSpec, what: str, listing: list[str]) -> RankscopeError:
    prefix = hub.subfolder.strip("/") + "/" if hub.subfolder else ""
    here = sorted({p[len(prefix):].split("/")[0] + ("/" if "/" in p[len(prefix):] else "")
                   for p in listing if p.startswith(prefix)})
    listed = ", ".join(here[:6]) + (", ..." if len(here) > 6 else "") if here else "nothing"
    where = f"at {hub.subfolder!r}" if hub.subfolder else "at its root"
    if what == MODEL:
        return RankscopeError(f"{hub} holds no model files {where} ({listed}): expected config.json and weights")
    return RankscopeError(f"{hub} holds no LoRA adapter {where} ({listed}): expected adapter_model.safetensors / .bin, "
                          "a LoRA .safetensors file or checkpoint-N/ folders (a base model repo is no adapter; name the "
                          "adapter's subfolder as owner/name/sub/folder)")


def _cached_listing(folder: Path) -> list[str]:
    """The files of a cached snapshot folder, as repo paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _choose(hub: HubSpec, what: str, listing: list[str]) -> list[str]:
    chosen = (model_files if what == MODEL else adapter_files)(listing, hub.subfolder)
    if not chosen:
        raise _no_files(hub, what, listing)
    return chosen


@functools.lru_cache(maxsize=64)  # one look-up per repo and process (a model is asked for by several loaders)
def _fetch(hub: HubSpec, what: str) -> Path:
    """Resolve ``hub`` in the cache, fetching what is missing (online) or finding it cached (offline)."""
    try:
        # imported on use: only a repo id needs huggingface_hub
        from huggingface_hub import HfApi, constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError as e:
        raise RankscopeError(f"{hub} is not a local path and huggingface_hub, which fetches repo ids, is not installed "
                             f"({e}): pip install huggingface_hub, or pass a local folder") from None
    label = f"{hub} does not exist here, and as a Hugging Face repo id it"
    unreachable = None
    if constants.is_offline_mode():
        unreachable = "HF_HUB_OFFLINE=1 is set: run once online, or pass a local folder"
    else:
        try:
            # one request (the file list of model_info), not the paged tree listing, which retries for ~25 s offline
            info = HfApi().model_info(hub.repo_id, revision=hub.revision)
            listing = sorted(s.rfilename for s in info.siblings or [])
        except RevisionNotFoundError:
            raise RankscopeError(f"{hub.repo_id} has no revision {hub.revision!r} on the Hugging Face Hub "
                                 f"({constants.ENDPOINT}): expected a branch, tag or commit of it") from None
        except RepositoryNotFoundError:
            raise RankscopeError(f"{label} is not on the Hugging Face Hub ({constants.ENDPOINT}), or is private or "
                                 "gated: expected a local path or an existing owner/name (set HF_TOKEN for a private "
                                 "or gated repo)") from None
        except Exception as e:  # no network, a proxy, the Hub down (httpx and HTTP errors alike): the cache may have it
            unreachable = (f"the Hub ({constants.ENDPOINT}) could not be reached ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'no message'}): check the network, or pass a local folder")
    if unreachable is not None:
        try:
            folder = Path(snapshot_download(hub.repo_id, revision=hub.revision, local_files_only=True, allow_patterns=[]))
        except (LocalEntryNotFoundError, OSError):
            raise RankscopeError(f"{label} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                                 f"{unreachable}") from None
        listing = _cached_listing(folder)
        _choose(hub, what, listing)
        return folder / hub.subfolder if hub.subfolder else folder
    chosen = _choose(hub, what, listing)
    try:
        folder = Path(snapshot_download(hub.repo_id, revision=hub.revision,
                                        allow_patterns=[glob.escape(path) for path in chosen]))
    except (RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError, OSError) as e:
        raise RankscopeError(f"{hub}: fetching {len(chosen)} files from the Hugging Face Hub failed "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'})") from None
    return folder / hub.subfolder if hub.subfolder else folder


__all__ = ["ADAPTER", "MODEL", "HubSpec", "parse_spec", "is_hub_spec", "resolve_local", "adapter_files", "model_files"]
