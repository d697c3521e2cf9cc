"""Rank telemetry while training: per-rank importances and update spectra of a live LoRA model.

    monitor = RankMonitor("runs/x"); monitor.record(model, step)     # a plain PyTorch loop
    # with transformers.Trainer: rankscope.telemetry.callback.RankMonitorCallback

Every record appends one line to ``rank_trace.jsonl`` (:mod:`rankscope.io.trace`) with the numbers
``rankscope analyze`` gives for an adapter saved at that step, computed where the weights live without a
d×k matrix: Gram matrices (float64 on CPU) or Householder QR (float32 on accelerators) of B and Aᵀ give
r×r factors, one batched SVD per rank takes the cores of all modules of that rank, and the small results
travel to the host in one transfer per device. Only the main process of a distributed run records; under
FSDP2 (sharded LoRA parameters) every process takes part in the measurement (column norms and r×r factors
reduce across processes, no full ΔW) and the main one writes.
A method exposes its per-rank weights through the model attribute :data:`TELEMETRY_ATTR` (see
:func:`measure`), so rankscope never imports the trainer. Importing this module loads neither torch nor
transformers. The user's guide: docs/telemetry.md.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from rankscope.constants import TRACE_FILE
from rankscope.errors import RankscopeError
from rankscope.io.formats import LoraModule
from rankscope.io.trace import append_record, module_text, record_text
from rankscope.maths.analysis import module_entry, nonfinite_error
from rankscope.maths.dynamics import STABLE_THRESHOLD, spectral_pair, spread_at, stability_pair, stable_from
from rankscope.maths.importance import GRAM_MAX_CONDITION
from rankscope.tasks import sharded
from rankscope.tasks.layers import LoraLayer, lora_layers, unwrap_model

if TYPE_CHECKING:  # pragma: no cover
    import torch

# A model carrying this attribute exposes per-rank weights between B and A. Its value is a callable
# returning {"method": str, "layers": {lora_layer_module: {"weights": w (r,), "scores": s (r,)}},
# "ranks_operated": int | None, "operation_step": int | None}; tensors may live on any device. The
# weights multiply each rank as AdaLoRA's E does (BeamLoRA's w, folded into A in its snapshots).
TELEMETRY_ATTR = "rankscope_telemetry"
SCALARS = {  # key in the Trainer's logs -> what it is (median over modules at the latest record)
    "rank/top10_share": "per-rank top-10% share",
    "rank/k95_over_r": "k95 / r (share of the rank holding 95% of ΔW's energy)",
    "rank/stable_rank_over_r": "stable rank / r",
    "rank/ranks_operated": "BeamLoRA: ranks pruned and refilled at the last operation",
}
CONFIRM = 3  # stable pairs in a row, in both views, before the stabilisation line is printed
LIVE_SCALE_SOURCE = "live PEFT layer's scaling"  # a trace's scales: read from the layers while training
_DTYPE_NAMES = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16"}


# ----------------------------------------------------------------------------- the LoRA layers of a live model


# ----------------------------------------------------------------------------- the maths on the device


@dataclass
class ModuleMeasure:
    """One module's record, on the host: what a trace line and an analysis entry hold."""

    name: str
    rank: int
    scale: float
    out_features: int
    in_features: int
    layer_type: str
    dtype: str
    dora: bool
    importance: np.ndarray | None  # None when A or B hold NaN or Inf
    spectrum: np.ndarray | None
    scores: np.ndarray | None = None  # BeamLoRA's raw scores
    E: np.ndarray | None = None  # AdaLoRA's E
    error: str | None = None

    def lora_module(self):
        """Metadata as a :class:`rankscope.formats.LoraModule` (no weights: never read)."""

        return LoraModule(name=self.name, rank=self.rank, scale=self.scale, scale_source=LIVE_SCALE_SOURCE,
                          in_features=self.in_features,
                          out_features=self.out_features, stored_dtype=self.dtype, layer_type=self.layer_type,
                          dora=self.dora, E=self.E, scores=self.scores)

    def text(self) -> str:
        """This module's object in a trace record."""
        meta: dict[str, Any] = {"name": self.name, "rank": self.rank, "scale": self.scale,
                                "scale_source": LIVE_SCALE_SOURCE, "shape": [self.out_features, self.in_features],
                                "layer_type": self.layer_type, "dtype": self.dtype}
        if self.dora:
            meta["dora"] = True
        if self.error:
            meta["error"] = self.error
        arrays = {"importance": self.importance, "spectrum": self.spectrum}
        if self.scores is not None:
            arrays["scores"] = self.scores
        if self.E is not None:
            arrays["E"] = self.E
        return module_text(meta, arrays)


def _gram_r_factors(sources: list[Callable[[], "torch.Tensor"]], grams: "torch.Tensor") -> "torch.Tensor":
    """r×r factors R with RᵀR = XᵀX from the stacked float64 Gram matrices (rankscope.importance._r_factor, batched).

    An ill-conditioned X (cond(X)² above 1e7) goes through Householder QR instead, as in the analysis.
    """
    import torch


    eigenvalues, vectors = torch.linalg.eigh(grams)
    top, low = eigenvalues[:, -1], eigenvalues[:, 0]
    factors = eigenvalues.clamp(min=0).sqrt().unsqueeze(-1) * vectors.mT
    factors[~(top > 0)] = 0
    for i in torch.nonzero((top > 0) & ~(low * GRAM_MAX_CONDITION > top)).flatten().tolist():
        factors[i] = _qr_r_factor(sources[i]())
    return factors


def _qr_r_factor(X: "torch.Tensor") -> "torch.Tensor":
    """The r×r R of a tall (n, r) X = Q R, zero rows appended when n < r (RᵀR = XᵀX still holds)."""
    import torch

    R = torch.linalg.qr(X, mode="r").R
    return torch.nn.functional.pad(R, (0, 0, 0, X.shape[1] - R.shape[0])) if R.shape[0] < X.shape[1] else R


def _tall_local(layer: LoraLayer, side: str, work_dtype: "torch.dtype") -> "torch.Tensor":
    """This process's rows of B (out, r) or of Aᵀ (in, r), whose r×r factors combine across processes.

    FSDP2 splits B along out (rows: local as is) and A along r; A is redistributed to be split along ``in``
    (an all-to-all on NCCL; gloo falls back to an all-gather of A, never of ΔW), so Aᵀ's rows are local too.
    """
    from torch.distributed.tensor import Shard

    if side == "B":
        return sharded.columns(layer.B).to(work_dtype)
    A = layer.A
    if sharded.is_sharded(A) and sharded.local_range(A, 0) != (0, A.shape[0]):
        A = A.redistribute(placements=[Shard(1)])
    return sharded.local(A).to(work_dtype).T


def _stacked_r(layer: LoraLayer, side: str, work_dtype: "torch.dtype") -> "torch.Tensor":
    """Every process's r×r QR factor of its rows, stacked (N·r, r): its own R factor is that of the whole X
    (X = diag(Q_k)·[R_1; …; R_N]), so QR of it gives what one process would (tall-skinny QR)."""
    R = _qr_r_factor(_tall_local(layer, side, work_dtype))
    return sharded.all_gather_stacked(R, [layer.A, layer.B]).reshape(-1, R.shape[1])


def _sharded_factors(layers: list[LoraLayer], work_dtype: "torch.dtype", gram: bool, grams: dict,
                     r_b: list, r_a: list) -> set[int]:
    """For the layers FSDP2 shards: Gram matrices summed over processes (one ``all_reduce`` for all layers) on
    the float64 CPU path, else R factors by tall-skinny QR (one ``all_gather`` for all layers). Returns
    which layers were done here; no full ΔW, A or B is formed on any process."""
    import torch

    split = [i for i, layer in enumerate(layers) if sharded.is_sharded(layer.A) or sharded.is_sharded(layer.B)]
    if not split:
        return set()
    like = [layers[split[0]].A, layers[split[0]].B]
    parts = [(i, side, _tall_local(layers[i], side, work_dtype)) for i in split for side in ("B", "A")]
    if gram:
        partial = torch.cat([(X.mT @ X).reshape(-1) for _, _, X in parts])
        sharded.all_reduce_sum(partial, like)
        start = 0
        for i, side, X in parts:
            size = X.shape[1] ** 2
            grams[(side, i)] = partial[start:start + size].view(X.shape[1], X.shape[1])
            start += size
    else:
        local_r = torch.cat([_qr_r_factor(X).reshape(-1) for _, _, X in parts])
        every = sharded.all_gather_stacked(local_r, like)  # (N, Σ r²)
        start = 0
        for i, side, X in parts:
            r = X.shape[1]
            stacked = every[:, start:start + r * r].reshape(-1, r)
            (r_b if side == "B" else r_a)[i] = _qr_r_factor(stacked)
            start += r * r
    return set(split)


def _on_device(layers: list[LoraLayer], coefficients: list["torch.Tensor | None"], extras: list[dict[str, Any]],
               work_dtype: "torch.dtype") -> list[dict[str, np.ndarray]]:
    """Unscaled per-rank norms (times |c|) and singular values of each B·diag(c)·A, plus extras, on the host.

    Everything stays on the layers' device until the one transfer at the end (no host sync per module;
    on CPU the Gram path checks conditioning on the host, which costs nothing there).
    """
    import torch

    device = sharded.local(layers[0].A).device
    gram = device.type == "cpu" and work_dtype == torch.float64
    norms, r_b, r_a, grams = [], [None] * len(layers), [None] * len(layers), {}
    split = _sharded_factors(layers, work_dtype, gram, grams, r_b, r_a)  # FSDP2: reduced across processes
    for i, (layer, c) in enumerate(zip(layers, coefficients)):
        if i in split:
            # ‖b_i‖² and ‖a_i‖²: the diagonals of the reduced Gram matrices, or the column norms of R (RᵀR = XᵀX)
            squares = [torch.diagonal(grams[(side, i)]) if (side, i) in grams
                       else torch.linalg.vector_norm(out[i], dim=0).square() for side, out in (("B", r_b), ("A", r_a))]
        else:
            A, B = layer.A.to(work_dtype), layer.B.to(work_dtype)
            squares = []  # ‖b_i‖² and ‖a_i‖²: the Gram matrices' diagonals, where they are formed anyway
            for side, X, out in (("B", B, r_b), ("A", A.T, r_a)):
                if gram and X.shape[0] >= X.shape[1]:
                    grams[(side, i)] = X.mT @ X
                    squares.append(torch.diagonal(grams[(side, i)]))
                else:
                    out[i] = _qr_r_factor(X)
                    squares.append(torch.linalg.vector_norm(X, dim=0).square())
        values = (squares[0] * squares[1]).sqrt()
        norms.append(values if c is None else values * c.to(work_dtype).abs())
    spectra: dict[int, torch.Tensor] = {}
    for rank in sorted({layer.rank for layer in layers}):
        members = [i for i, layer in enumerate(layers) if layer.rank == rank]
        for side, out in (("B", r_b), ("A", r_a)):
            pending = [i for i in members if (side, i) in grams]
            if pending:
                stacked = torch.stack([grams.pop((side, i)) for i in pending])
                stacked = torch.where(torch.isfinite(stacked).all(-1, keepdim=True).all(-2, keepdim=True), stacked, 0)
                sources = [(lambda i=i, side=side: _stacked_r(layers[i], side, work_dtype) if i in split
                            else (layers[i].B if side == "B" else layers[i].A.T).to(work_dtype)) for i in pending]
                for i, R in zip(pending, _gram_r_factors(sources, stacked)):
                    out[i] = R
        R_B = torch.stack([r_b[i] for i in members])
        R_A = torch.stack([r_a[i] for i in members])
        c = torch.stack([torch.ones(rank, dtype=work_dtype, device=device) if coefficients[i] is None
                         else coefficients[i].to(work_dtype).reshape(-1) for i in members])
        cores = (R_B * c.unsqueeze(1)) @ R_A.mT
        finite = torch.isfinite(cores).all(-1, keepdim=True).all(-2, keepdim=True)
        values = torch.linalg.svdvals(torch.where(finite, cores, 0))  # one batched SVD for all modules of this rank
        for i, row in zip(members, values):
            spectra[i] = row
    # One transfer: every small result in one flat tensor.
    parts, layout = [], []
    for i in range(len(layers)):
        for key, tensor in (("importance", norms[i]), ("spectrum", spectra[i]), *extras[i].items()):
            flat = tensor.detach().reshape(-1).to(device=device, dtype=work_dtype)
            parts.append(flat)
            layout.append((i, key, flat.numel()))
    host = torch.cat(parts).to("cpu", torch.float64).numpy()
    out: list[dict[str, np.ndarray]] = [{} for _ in layers]
    start = 0
    for i, key, size in layout:
        out[i][key] = host[start:start + size]
        start += size
    return out


@contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """torch on one CPU thread meanwhile (as ``analysis.one_blas_thread``): the work is n×r products and r×r
    factorisations, too small to share out, and on a busy machine spinning threads made a batch of 64×64
    eigendecompositions 20× slower with two threads than with one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _telemetry(model: Any) -> dict[str, Any] | None:
    provider = getattr(model, TELEMETRY_ATTR, None)
    return provider() if callable(provider) else None


def measure(model: Any, dtype: "torch.dtype | None" = None) -> tuple[list[ModuleMeasure], dict[str, Any]]:
    """Per-rank importances and update spectra of every active LoRA update of ``model``, as analysed.

    ``dtype`` is the working precision (default: float64 on CPU, float32 on accelerators). Returns the
    modules and the record's extras (``method``; for BeamLoRA ``ranks_operated`` and ``operation_step``).
    A model whose attribute :data:`TELEMETRY_ATTR` provides per-rank weights (BeamLoRA) has them
    multiplied into each rank, and its raw scores attached.
    """
    import torch

    model = unwrap_model(model)
    layers = lora_layers(model)
    if not layers:
        raise RankscopeError(f"{type(model).__name__} has no active LoRA layer: expected a PEFT LoRA model "
                             "(get_peft_model(model, LoraConfig(...)))")
    telemetry = _telemetry(model) or {}
    by_module = telemetry.get("layers") or {}
    results: list[dict[str, np.ndarray] | None] = [None] * len(layers)
    with torch.no_grad(), _one_cpu_thread():
        groups: dict[Any, list[int]] = {}
        for i, layer in enumerate(layers):
            groups.setdefault(layer.A.device, []).append(i)
        for device, members in groups.items():
            work = dtype or (torch.float64 if device.type == "cpu" else torch.float32)
            coefficients, extras = [], []
            for i in members:
                layer, given = layers[i], by_module.get(layers[i].module) or {}
                c = layer.E
                if given.get("weights") is not None:
                    c = given["weights"].reshape(-1) if c is None else c * given["weights"].reshape(-1)
                coefficients.append(c)
                extra = {}
                if given.get("scores") is not None:
                    extra["scores"] = given["scores"]
                if layer.E is not None:
                    extra["E"] = layer.E
                if layer.ranknum is not None:
                    extra["ranknum"] = layer.ranknum
                extras.append(extra)
            for i, host in zip(members, _on_device([layers[i] for i in members], coefficients, extras, work)):
                results[i] = host
    modules = []
    for layer, host in zip(layers, results):
        scale = layer.scale if "ranknum" not in host else layer.scale / (float(host["ranknum"][0]) + 1e-5)
        importance, spectrum, error = abs(scale) * host["importance"], abs(scale) * host["spectrum"], None
        if not np.isfinite(importance).all():

            with torch.no_grad():
                bad = [what for what, x in (("A", layer.A), ("B", layer.B)) if not bool(torch.isfinite(x).all())]
            importance, spectrum, error = None, None, nonfinite_error(layer.name, bad)
        modules.append(ModuleMeasure(
            name=layer.name, rank=layer.rank, scale=float(scale), out_features=layer.B.shape[0],
            in_features=layer.A.shape[1], layer_type=layer.layer_type,
            dtype=_DTYPE_NAMES.get(str(layer.A.dtype).removeprefix("torch."), str(layer.A.dtype)), dora=layer.dora,
            importance=importance, spectrum=spectrum, scores=host.get("scores"), E=host.get("E"), error=error))
    extra = {"method": str(telemetry.get("method", "lora"))}
    for key in ("ranks_operated", "operation_step"):
        if telemetry.get(key) is not None:
            extra[key] = int(telemetry[key])
    return modules, extra


# ----------------------------------------------------------------------------- the monitor


def is_main_process() -> bool:
    """Rank 0 of a torch.distributed run, or the only process (a check, not a collective)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _print_line(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)  # above a progress bar, not through it


class RankMonitor:
    """Records a live LoRA model's rank telemetry into ``output_dir/rank_trace.jsonl``.

    Args:
        output_dir: the run folder (None: compute the scalars and stability, write nothing).
        trace_file: the trace's file name inside ``output_dir``.
        dtype: working precision (default float64 on CPU, float32 on accelerators).
        threshold: the stability threshold of :func:`rankscope.dynamics.stable_from` (both views).
        confirm: stable consecutive pairs, in both views, before stabilisation is announced.
        log: where the stabilisation line goes (default: stderr, above any progress bar).

    ``record(model, step)`` measures, appends one record and returns the live scalars
    (:data:`SCALARS`); on any process but the main one it returns None (at once, unless FSDP2 shards the
    model: then every process takes part in the measurement).
    """

    def __init__(self, output_dir: str | os.PathLike | None = None, *, trace_file: str = TRACE_FILE,
                 dtype: "torch.dtype | None" = None, threshold: float | None = None, confirm: int = CONFIRM,
                 log: Callable[[str], None] | None = None):

        self.path = Path(output_dir) / trace_file if output_dir is not None else None
        self.dtype = dtype
        self.threshold = STABLE_THRESHOLD if threshold is None else threshold
        self.confirm = confirm
        self.log = log or _print_line
        self.records = 0  # records this process computed
        self.last_step: int | None = None
        self.latest: dict[str, float] = {}  # scalars of the latest record
        self.stable_step: int | None = None  # announced stabilisation step
        self.stable_announced_at: int | None = None  # the step of the record that announced it
        self._pending = False
        self._previous: dict[str, Any] | None = None
        self._steps: list[int] = []
        self._pairs: list[dict[str, float]] = []
        self._spectral_pairs: list[dict[str, float]] = []

    def record(self, model: Any, step: int, main_process: bool | None = None) -> dict[str, float] | None:
        """Measure ``model`` at optimizer step ``step``, append the record, return the live scalars.

        A model sharded by FSDP2 is measured by every process together (its r×r factors reduce across them),
        so every process must call this; only the main one writes and returns the scalars.
        """
        main = is_main_process() if main_process is None else main_process
        if not main and not sharded.any_sharded(unwrap_model(model).parameters()):
            return None

        modules, extra = measure(model, self.dtype)
        if not main:
            self.last_step = int(step)  # the callback asks once per step on every process: collectives pair up
            return None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            method = extra.pop("method")
            beamlora = {k: extra[k] for k in ("ranks_operated", "operation_step") if k in extra}
            append_record(self.path, record_text(step, [m.text() for m in modules], time=time.time(), method=method,
                                                 extra={"beamlora": beamlora} if beamlora else None))
        snapshot = {"step": int(step), "modules": [module_entry(m.lora_module(), m.importance, m.spectrum, m.error)
                                                   for m in modules]}
        self.records += 1
        self.last_step = int(step)
        self.latest = live_scalars(snapshot, extra)
        self._pending = True
        self._follow_stability(snapshot)
        return dict(self.latest)

    def take_pending(self) -> dict[str, float]:
        """The latest record's scalars if they have not been handed out yet (for the Trainer's logs)."""
        if not self._pending:
            return {}
        self._pending = False
        return dict(self.latest)

    def _follow_stability(self, snapshot: dict[str, Any]) -> None:
        """Both views' pair tests between consecutive records; announce once when both have held ``confirm`` times."""

        previous, self._previous = self._previous, {"step": snapshot["step"], "modules": [
            {k: m.get(k) for k in ("name", "rank", "importance", "energy_rank")} for m in snapshot["modules"]]}
        self._steps.append(snapshot["step"])
        if previous is None:
            return
        self._pairs.append({"median": stability_pair(previous, self._previous)["median"]})
        self._spectral_pairs.append({"median": spectral_pair(previous, self._previous)["median"]})
        if self.stable_step is not None:
            return
        rank_start = stable_from(self._pairs, self.threshold)
        spectral_start = stable_from(self._spectral_pairs, self.threshold)
        if rank_start is None or spectral_start is None:
            return
        start = max(rank_start, spectral_start)
        held = len(self._pairs) - start
        if held >= self.confirm:
            self.stable_step, self.stable_announced_at = self._steps[start], self._steps[-1]
            self.log(f"rankscope: rank order and energy ranks stable from step {self.stable_step} "
                     f"(median Spearman ≥ {self.threshold:g} and k95 steady in ≥ {self.threshold:.0%} of modules at "
                     f"each of the {held} records since): BeamLoRA's first operation (Δt) should not come earlier; "
                     "`rankscope recommend RUN_DIR` scales it to a longer run")


def live_scalars(snapshot: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, float]:
    """The live scalars of one record (medians over modules, as ``dynamics.spread_at``); finite ones only."""

    spread = spread_at(snapshot)
    values = {"rank/top10_share": spread["top10_share"]["median"],
              "rank/k95_over_r": spread["energy_rank_ratio"]["median"],
              "rank/stable_rank_over_r": spread["stable_rank_ratio"]["median"]}
    if extra and extra.get("ranks_operated") is not None:
        values["rank/ranks_operated"] = float(extra["ranks_operated"])
    return {key: float(value) for key, value in values.items() if math.isfinite(value)}


# ----------------------------------------------------------------------------- the Trainer callback





__all__ = ["RankMonitor", "measure", "live_scalars", "TELEMETRY_ATTR", "SCALARS"]
