"""From checkpoints to the analysis document (``rankscope/analysis-v1``) and its summaries.

The document is what every other part reads (plots, reports, compare, recommend, the JSON
users get): one entry per snapshot, one per module, importances in the checkpoint's rank order.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rankscope.constants import ANALYSIS_SCHEMA, TRACE_SCHEMA
from rankscope.errors import RankscopeError
from rankscope.io.documents import load_document
from rankscope.io.formats import LoraModule
from rankscope.io.loading import Checkpoint, Series, SnapshotRef, discover
from rankscope.io.trace import index_records, iter_records, last_record
from rankscope.maths import importance as imp
from rankscope.maths import structured
from rankscope.maths.verdict import utilisation_verdict
from rankscope.progress import progress_bar

SCHEMA = ANALYSIS_SCHEMA
TOP_FRACTION = 0.1
ENERGY_KEY = "0.95"  # the energy level the summaries, verdicts and suggestions speak of (k95)
SPECTRAL_RATIOS = ("energy_rank_ratio", "stable_rank_ratio", "spectral_effective_rank_ratio")


def spectrum_meaning(module: LoraModule) -> str:
    """What the module's ``spectrum`` holds the singular values of, in words (where it is not plain scale·B A)."""
    if module.method != "lora":
        return STRUCTURED_MEANING[module.method] + (" (conv kernel flattened to (out, in·kh·kw))"
                                                    if module.layer_type == "conv" else "")
    if module.E is not None:
        return "scale·B·diag(E)·A: AdaLoRA's update, E holding its learned singular values"
    if module.rank_weights is not None:
        return "scale·B·diag(w)·A: BeamLoRA's update with w = r·softmax(gate/T) stored beside A"
    if module.dora:
        return ("scale·B·A, the low-rank part only: DoRA also rescales each output by a learned magnitude, "
                "so the applied update is not B·A alone")
    if module.layer_type == "conv":
        return "scale·B·A with A flattened to (r, in·kh·kw): the conv kernel's update as a matrix"
    if module.layer_type == "embedding":
        return "scale·B·A: the embedding table's update (transposed; the same singular values)"
    return "scale·B·A"


def nonfinite_error(name: str, parts: list[str]) -> str:
    """The ``error`` of a module whose A or B (``parts``) holds NaN or Inf."""
    where = " and ".join(parts) if parts else "its scale or coefficients"
    return f"{where} of {name} hold NaN or Inf: no importance can be computed for this module"


def overflow_error(module: LoraModule, A: np.ndarray, B: np.ndarray) -> str:
    """The ``error`` of a module whose A, B and scale are finite but whose update overflows float64."""
    return (f"the update of {module.name} overflows float64: its A and B are finite (largest |A| "
            f"{np.abs(A).max():.3g}, |B| {np.abs(B).max():.3g}) but scale {module.scale:.3g} · B · A is not: no "
            "importance can be computed for this module")


def module_entry(module: LoraModule, importance: np.ndarray | None, spectrum: np.ndarray | None = None,
                 error: str | None = None) -> dict[str, Any]:
    """One module's JSON-ready entry from its metadata, importances and spectrum (no A or B is read).

    ``importance`` None gives the entry of a module that could not be analysed, with ``error``.
    Used for checkpoints (:func:`analyze_module`) and for rank traces recorded while training.
    """
    entry: dict[str, Any] = {
        "name": module.name,
        "rank": module.rank,
        "scale": module.scale,
        "layer": module.layer,
        "kind": module.kind,
        "shape": [module.out_features, module.in_features],
        "layer_type": module.layer_type,
        "dtype": module.stored_dtype,
    }
    if module.scale_source:
        entry["scale_source"] = module.scale_source  # where the scale was read from (lora_adapter_metadata, ...)
    if importance is None:
        entry.update(importance=None, deciles=None, error=error)
        return entry
    values = np.asarray(importance, dtype=np.float64)
    entry["importance"] = values.tolist()
    entry["deciles"] = imp.deciles(values).tolist()
    entry["top10_share"] = imp.top_share(values, TOP_FRACTION)
    entry["effective_rank"] = imp.effective_rank(values)
    entry["gini"] = imp.gini(values)
    if spectrum is not None:
        values = np.asarray(spectrum, dtype=np.float64)
        entry["spectrum"] = values.tolist()
        entry["spectrum_of"] = spectrum_meaning(module)
        entry["energy_rank"] = imp.energy_ranks(values)
        entry["stable_rank"] = imp.stable_rank(values)
        entry["spectral_effective_rank"] = imp.spectral_effective_rank(values)
    if module.scores is not None:
        entry["scores"] = np.asarray(module.scores, dtype=np.float64).tolist()
    if module.E is not None:
        entry["adalora_E"] = np.asarray(module.E, dtype=np.float64).tolist()
    return entry


def analyze_module(module: LoraModule, spectrum: bool = True) -> dict[str, Any]:
    """Importance, deciles and spread of one module, as a JSON-ready dict."""
    if module.method != "lora":
        return analyze_structured_module(module, spectrum)
    # Widened to float64 once here, not again inside each importance function.
    with np.errstate(invalid="ignore"):  # a signalling NaN in fp16 warns when widened; it is reported below
        A, B = np.asarray(module.A, dtype=np.float64), np.asarray(module.B, dtype=np.float64)
    bad = [what for what, x in (("A", A), ("B", B)) if not np.isfinite(x).all()]
    if bad or not math.isfinite(module.scale):
        return module_entry(module, None, error=nonfinite_error(module.name, bad))
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported as such below
        values = imp.rank_importance(A, B, module.scale, module.coefficients)
        try:
            spectral = imp.update_spectrum(A, B, module.scale, module.coefficients) if spectrum else None
        except np.linalg.LinAlgError:  # LAPACK met Inf from an overflow
            spectral = np.full(module.rank, np.inf)
    if not np.isfinite(values).all() or (spectral is not None and not np.isfinite(spectral).all()):
        if module.coefficients is not None and not np.isfinite(module.coefficients).all():
            return module_entry(module, None, error=nonfinite_error(module.name, []))
        return module_entry(module, None, error=overflow_error(module, A, B))
    return module_entry(module, values, spectral)


def spectral_ratios(module: dict[str, Any]) -> dict[str, float] | None:
    """k95 / r, stable rank / r and spectral effective rank / r of one analysed module (None without a spectrum).

    A zero update has k95 = 0 and undefined (NaN) stable and effective ranks.
    """
    if module.get("energy_rank") is None or not module.get("rank"):
        return None
    r = module["rank"]

    def ratio(value: Any) -> float:
        return value / r if value is not None and math.isfinite(value) else float("nan")

    return {"energy_rank_ratio": ratio(module["energy_rank"].get(ENERGY_KEY)),
            "stable_rank_ratio": ratio(module.get("stable_rank")),
            "spectral_effective_rank_ratio": ratio(module.get("spectral_effective_rank"))}


def _group_medians(modules: list[dict[str, Any]], key: str, spectral: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Per layer (or kind): decile band and the median of each measure of both views."""
    groups: dict[str, list] = defaultdict(list)
    for m in modules:
        groups[m[key]].append(m)
    out = {}
    for label, ms in groups.items():
        slots = [m for m in ms if m.get("importance") is not None]  # LoHa / LoKr modules have no per-rank view
        entry = {
            "modules": len(ms),
            "deciles": imp.decile_band(np.array([m["deciles"] for m in slots])),
            "top10_share": imp.band(m["top10_share"] for m in slots)["median"],
            "effective_rank_ratio": imp.band(m["effective_rank"] / m["rank"] for m in slots)["median"],
        }
        for name in SPECTRAL_RATIOS:
            entry[name] = imp.band(spectral[id(m)][name] for m in ms if id(m) in spectral)["median"]
        out[label] = entry
    return out


def summarize(modules: list[dict[str, Any]]) -> dict[str, Any]:
    """Spread over modules in both views (all, by layer, by kind), counts, ranks, scales, and the verdict.

    Per-rank view: top-10% share, effective rank / r, Gini, deciles of the slot norms. Spectral view:
    energy ranks (k90, k95, k99), k95 / r, stable rank / r, spectral effective rank / r, the
    cumulative-energy curve against k / r, how many modules use all of their rank and how many are zero.
    """

    good = [m for m in modules if m.get("importance") is not None]
    ranks = sorted({m["rank"] for m in modules})
    scales = sorted({round(m["scale"], 12) for m in modules})
    uniform_top = [min(1.0, max(1, np.ceil(TOP_FRACTION * m["rank"] - 1e-9)) / m["rank"]) for m in good]
    # LoHa / LoKr modules have a spectrum and no per-rank view (importance null): counted here, not in ``good``
    spectral = {id(m): ratios for m in modules if (ratios := spectral_ratios(m)) is not None}
    with_spectrum = [m for m in modules if id(m) in spectral]
    grouped = [m for m in modules if m.get("importance") is not None or id(m) in spectral]
    summary: dict[str, Any] = {
        "modules": len(modules),
        "ranks": ranks,
        "scales": scales if len(scales) <= 8 else [scales[0], scales[-1]],
        "total_ranks": int(sum(m["rank"] for m in modules)),
        "top10_share": imp.band(m["top10_share"] for m in good),
        "top10_share_uniform": float(np.median(uniform_top)) if uniform_top else float("nan"),
        "effective_rank_ratio": imp.band(m["effective_rank"] / m["rank"] for m in good),
        "gini": imp.band(m["gini"] for m in good),
        "deciles": imp.decile_band(np.array([m["deciles"] for m in good])),
        "spectral_modules": len(with_spectrum),
        "energy_ranks": {level: imp.band(m["energy_rank"][level] for m in with_spectrum)
                         for level in (f"{x:g}" for x in imp.ENERGY_LEVELS)},
        "stable_rank": imp.band(m["stable_rank"] for m in with_spectrum),
        **{name: imp.band(spectral[id(m)][name] for m in with_spectrum) for name in SPECTRAL_RATIOS},
        "energy_curve": {"k_over_r": imp.ENERGY_GRID.tolist(),
                         **imp.curve_band(np.array([imp.energy_curve(m["spectrum"]) for m in with_spectrum]),
                                          imp.ENERGY_GRID.size)},
        "full_rank_modules": sum(1 for m in with_spectrum if m["energy_rank"][ENERGY_KEY] == m["rank"]),
        "zero_modules": sum(1 for m in with_spectrum if m["energy_rank"][ENERGY_KEY] == 0),
        "by_layer": _group_medians(grouped, "layer", spectral),
        "by_kind": _group_medians(grouped, "kind", spectral),
        "errors": [m["error"] for m in modules if "error" in m],
    }
    undefined = sum(1 for m in modules if m.get("per_rank_undefined"))
    if undefined:
        summary["per_rank_undefined"] = undefined
    sources = sorted({m["scale_source"] for m in modules if m.get("scale_source")})
    if sources:
        summary["scale_sources"] = sources
    summary["verdict"] = utilisation_verdict(summary)
    return summary


def analysis_threads() -> int:
    """Modules analysed at once: the usable cores (at most 4), or ``RANKSCOPE_THREADS``."""
    try:
        return max(1, int(os.environ["RANKSCOPE_THREADS"]))
    except (KeyError, ValueError):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(4, cores))


def analyze_checkpoint(checkpoint: Checkpoint, spectrum: bool = True) -> dict[str, Any]:
    """One element of the document's ``snapshots`` list.

    Modules are independent, and numpy releases the GIL inside its kernels, so they are analysed on
    a few threads (each with single-threaded BLAS: small r×r work shares out badly within one module).
    """
    threads = analysis_threads()
    if threads > 1 and len(checkpoint.modules) > 8:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            modules = list(pool.map(lambda m: analyze_module(m, spectrum), checkpoint.modules))
    else:
        modules = [analyze_module(m, spectrum) for m in checkpoint.modules]
    return {
        "step": checkpoint.step,
        "path": str(checkpoint.path),
        "format": checkpoint.format,
        "modules": modules,
        "skipped": len(checkpoint.skipped),
        "skipped_names": checkpoint.skipped[:20],
        "notes": checkpoint.notes,
        "summary": summarize(modules),
    }


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run numpy's BLAS on one thread meanwhile.

    The work here is r×r factorisations and n×r products: too small to share out, and BLAS
    threads spin while they wait, so on a busy machine a 64×64 eigendecomposition measured 50×
    slower with two threads than with one.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def analyze(path: str | os.PathLike, format: str | None = None, spectrum: bool = True,
            progress: bool | None = None, last_only: bool = False, all_records: bool = False) -> dict[str, Any]:
    """Analyse a checkpoint or every snapshot of a run (only the last with ``last_only``), one
    snapshot in memory at a time. A run's rank trace (``rank_trace.jsonl``, or the file itself), when
    there is one, gives the snapshots instead of its snapshot folders: layout ``"trace"`` (at most
    :data:`MAX_TRACE_RECORDS` of them, evenly spread, unless ``all_records``).

    Returns the ``rankscope/analysis-v1`` document (see the README for its fields).
    """
    found = discover(path, format)
    traced = isinstance(found, Series) and found.trace is not None
    if traced:  # recorded while training: the dense time axis, nothing to load (snapshot folders stay for sweeps)

        with one_blas_thread():
            snapshots = trace_snapshots(found.trace, spectrum, last_only, progress, all_records)
    else:
        refs = found.snapshots if isinstance(found, Series) else [found]
        refs = refs[-1:] if last_only else refs
        snapshots = []
        with progress_bar(len(refs), progress, "analysing snapshots", "snapshot") as bar, one_blas_thread():
            for ref in refs:
                snapshots.append(analyze_checkpoint(ref.load(), spectrum))
                bar.update(1)
    document: dict[str, Any] = {
        "schema": SCHEMA,
        "path": str(path),
        "format": snapshots[0]["format"] if snapshots else None,
        "layout": "trace" if traced else found.layout if isinstance(found, Series) else "single",
        "snapshots": snapshots,
    }
    if isinstance(found, Series):
        document["final"] = str(found.final.weights) if found.final else None
        notes: list[str] = []
        document["events"] = found.events(notes)
        if notes and snapshots:  # a torn last line of events.jsonl: skipped, and said
            snapshots[-1]["notes"] = snapshots[-1]["notes"] + notes
    return document


def analyze_or_read(path: str | os.PathLike, format: str | None = None, progress: bool | None = None,
                    last_only: bool = False, all_records: bool = False) -> dict[str, Any]:
    """An analysis document from a checkpoint path, or from a JSON file ``rankscope analyze`` wrote."""
    if str(path).endswith(".json") and os.path.isfile(path):
        return load_document(path)
    return analyze(path, format=format, progress=progress, last_only=last_only, all_records=all_records)


__all__ = ["SCHEMA", "analyze", "analyze_checkpoint", "analyze_module", "module_entry", "summarize", "load_document",
           "analyze_or_read", "SnapshotRef"]


def record_notes(record: dict[str, Any]) -> list[str]:
    notes = []
    if record.get("method") == "beamlora":
        notes.append(_BEAMLORA_NOTE)
    if any(m.get("dora") for m in record["modules"] if isinstance(m, dict)):
        notes.append(_DORA_NOTE)
    return notes



def _array(values: Any, name: str, field: str, rank: int) -> np.ndarray | None:
    if values is None:
        return None
    x = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    if x.shape != (rank,):
        raise RankscopeError(f"trace module {name}: {field} has {x.size} values, expected rank {rank}")
    return x



def record_snapshot(record: dict[str, Any], path: str | os.PathLike, spectrum: bool = True) -> dict[str, Any]:
    """One element of an analysis document's ``snapshots`` from a trace record: the same fields as a checkpoint's."""
    entries = []
    for m in record["modules"]:
        try:
            name, rank, (out_features, in_features) = str(m["name"]), int(m["rank"]), m["shape"]
            module = LoraModule(name=name, rank=rank, scale=float(m["scale"]), in_features=int(in_features),
                                out_features=int(out_features), stored_dtype=str(m.get("dtype", "")),
                                scale_source=str(m.get("scale_source", "")),
                                layer_type=str(m.get("layer_type", "linear")), dora=bool(m.get("dora", False)),
                                E=_array(m.get("E"), name, "E", rank), scores=_array(m.get("scores"), name, "scores", rank))
            importance = _array(m.get("importance"), name, "importance", rank)
            spectral = _array(m.get("spectrum"), name, "spectrum", rank) if spectrum else None
        except (KeyError, TypeError, ValueError) as e:
            raise RankscopeError(f"{path}: the record of step {record['step']} has a module entry that is not "
                                 f"rankscope's ({type(e).__name__}: {e}); expected name, rank, scale, shape, "
                                 "importance, spectrum") from None
        if importance is None or not np.isfinite(importance).all():
            entries.append(module_entry(module, None, error=m.get("error") or nonfinite_error(name, [])))
        else:
            entries.append(module_entry(module, importance, spectral))
    return {
        "step": record["step"],
        "path": f"{path}#step={record['step']}",
        "format": record.get("format", "peft"),
        "modules": entries,
        "skipped": 0,
        "skipped_names": [],
        "notes": record_notes(record),
        "summary": summarize(entries),
    }



MAX_TRACE_RECORDS = 1000  # records analysed from one trace: an even subsample of a longer one (all_records: every one)


def even_subsample(count: int, limit: int) -> list[int]:
    """``limit`` indices of ``range(count)`` spread evenly, the first and the last included (all when count ≤ limit)."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def trace_snapshots(path: str | os.PathLike, spectrum: bool = True, last_only: bool = False,
                    progress: bool | None = None, all_records: bool = False) -> list[dict[str, Any]]:
    """The records of a trace as analysis snapshots: every one up to :data:`MAX_TRACE_RECORDS`, an even
    subsample of a longer trace (first and last kept, with a note) unless ``all_records``, only the newest
    with ``last_only``. Records are read one at a time; only each line's step is read from the rest.

    Reading notes (incomplete lines, replaced records, the subsample) go into the last snapshot's ``notes``.
    """
    path = Path(path)
    notes: list[str] = []
    if last_only:
        record = last_record(path, notes)
        snapshots = [record_snapshot(record, path, spectrum)] if record is not None else []
    else:
        kept, bad, replaced = index_records(path)
        if not all_records and len(kept) > MAX_TRACE_RECORDS:
            chosen = [kept[i] for i in even_subsample(len(kept), MAX_TRACE_RECORDS)]
            notes.append(f"{path}: {len(kept)} records; an even subsample of {len(chosen)} is analysed (steps "
                         f"{chosen[0][1]} to {chosen[-1][1]}, first and last kept): --all-records takes every one")
            kept = chosen
        with progress_bar(len(kept), progress, "reading the rank trace", "record") as bar:
            snapshots = [record_snapshot(record, path, spectrum)
                         for record in iter_records(path, notes, lambda: bar.update(1), (kept, bad, replaced))]
    if not snapshots:
        raise RankscopeError(f"{path} holds no complete rank trace record: expected lines of "
                             f"{{\"schema\": \"{TRACE_SCHEMA}\", \"step\": ..., \"modules\": [...]}}")
    snapshots[-1]["notes"] = snapshots[-1]["notes"] + notes
    return snapshots


_DORA_NOTE = ("DoRA adapter: its update also rescales each output by a learned magnitude, so ΔW is not B A alone; "
              "rankscope reports the importances of B A")



_BEAMLORA_NOTE = ("BeamLoRA run: w = r·softmax(s/T) is folded into each importance and spectrum (as in its "
                  "snapshots); raw scores s are attached")


# ----------------------------------------------------------------------------- LoHa / LoKr

STRUCTURED_MEANING = {
    "loha": "scale·(W1a·W1b)⊙(W2a·W2b): LoHa's Hadamard product, through its face-splitting factors of rank r1·r2",
    "lokr": "scale·kron(W1, W2): LoKr's Kronecker product, each singular value a product σ_i(W1)·σ_j(W2)",
}
PER_RANK_UNDEFINED = ("undefined for {method}: ΔW is not a sum of rank-one B·A slots, so there are no slot norms "
                      "(the spectral view is exact)")
_METHOD_NAMES = {"loha": "LoHa", "lokr": "LoKr"}


def analyze_structured_module(module: LoraModule, spectrum: bool = True) -> dict[str, Any]:
    """A LoHa / LoKr module: the spectral view through its structure (:mod:`rankscope.maths.structured`); the
    per-rank fields are null with the reason in ``per_rank_undefined``."""
    with np.errstate(invalid="ignore"):
        parts = module.parts
    bad = [what for what, x in parts.items() if not np.isfinite(x).all()]
    if bad or not math.isfinite(module.scale):
        return module_entry(module, None, error=nonfinite_error(module.name, [f"factor {b}" for b in bad]))
    spectral = None
    if spectrum:
        with np.errstate(over="ignore", invalid="ignore"):
            try:
                spectral = structured.spectrum(module.method, parts, module.scale)
            except np.linalg.LinAlgError:  # LAPACK met Inf from an overflow
                spectral = np.full(module.rank, np.inf)
        if not np.isfinite(spectral).all():
            return module_entry(module, None, error=(
                f"the update of {module.name} overflows float64: its factors are finite but scale "
                f"{module.scale:.3g} times their product is not: no spectrum can be computed for this module"))
    entry = module_entry(module, None)
    del entry["error"]
    entry.update(method=module.method, structure=module.structure, top10_share=None, effective_rank=None, gini=None,
                 per_rank_undefined=PER_RANK_UNDEFINED.format(method=_METHOD_NAMES[module.method]))
    if spectral is not None:
        entry["spectrum"] = spectral.tolist()
        entry["spectrum_of"] = spectrum_meaning(module)
        entry["energy_rank"] = imp.energy_ranks(spectral)
        entry["stable_rank"] = imp.stable_rank(spectral)
        entry["spectral_effective_rank"] = imp.spectral_effective_rank(spectral)
    return entry
