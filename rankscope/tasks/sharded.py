"""Parameters sharded by PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): the few moves BeamLoRA and the monitor need.

Under FSDP2 every parameter is a ``DTensor`` split along dim 0 into ``torch.chunk`` pieces, one per process:
``lora_A`` (r, in) along the rank axis, ``lora_B`` (out, r) along ``out``, a score vector (r,) along r. The
helpers here read and write rows of such tensors through their local shards, moving only the rows asked for
(one ``all_reduce`` of a small buffer for any number of requests), and act on plain tensors as plain indexing
(no collective), so the same code runs on one process, under DDP and under FSDP2. Every process of the group
must call a function that takes part in a collective (``gather_rows``, ``full_tensors``) with the same requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from rankscope.errors import RankscopeError

if TYPE_CHECKING:  # pragma: no cover
    import torch


def is_sharded(tensor: Any) -> bool:
    """True for a ``DTensor`` (a parameter or optimizer state that FSDP2 manages)."""
    import torch

    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def any_sharded(tensors: Any) -> bool:
    """True if any of ``tensors`` (an iterable, e.g. ``model.parameters()``) is sharded."""
    return any(is_sharded(t) for t in tensors)


def local(tensor: "torch.Tensor") -> "torch.Tensor":
    """This process's shard (a view that writes through), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def _shard_dim(tensor: "torch.Tensor") -> int | None:
    """The dim a 1-D-mesh DTensor is split along (None: replicated); anything else is refused."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(tensor.placements)
    if len(placements) == 1 and isinstance(placements[0], Shard):
        return placements[0].dim
    if all(isinstance(p, Replicate) for p in placements):
        return None
    raise RankscopeError(f"a sharded tensor with placements {placements} found, expected FSDP2's Shard(0) on a "
                         "1-D device mesh")


def local_range(tensor: "torch.Tensor", dim: int = 0) -> tuple[int, int]:
    """The global indices ``[start, stop)`` along ``dim`` that this process holds (all of them for a plain tensor)."""
    size = tensor.shape[dim]
    if not is_sharded(tensor) or _shard_dim(tensor) != dim:
        return 0, size
    mesh = tensor.device_mesh
    chunk = -(-size // mesh.size())  # torch.chunk: ceil(size / N) each, the last ones shorter or empty
    start = min(mesh.get_local_rank() * chunk, size)
    return start, min(start + chunk, size)


def columns(tensor: "torch.Tensor") -> "torch.Tensor":
    """The local rows of ``tensor`` with *all* their columns (B (out, r) under FSDP2: every rank column is here)."""
    if is_sharded(tensor) and _shard_dim(tensor) not in (None, 0):
        raise RankscopeError(f"a tensor sharded along dim {_shard_dim(tensor)} found, expected dim 0 (FSDP2)")
    return local(tensor)


def _group(tensors: Sequence[Any]) -> Any:
    for t in tensors:
        if is_sharded(t):
            return t.device_mesh.get_group()
    return None


def index_tensor(index: Any, device: Any) -> "torch.Tensor":
    """A host array of indices on ``device`` without a host synchronisation: on CUDA through pinned memory and a
    non-blocking copy (a plain ``.to(cuda)`` of pageable memory waits for the stream)."""
    import numpy as np
    import torch

    host = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def gather_rows(requests: Sequence[tuple["torch.Tensor", Any]]) -> list["torch.Tensor"]:
    """``tensor[index]`` (whole rows along dim 0) for each ``(tensor, index)``, as plain tensors on every process.

    ``index`` is a host array of row numbers (numpy or a list), so which rows a process owns is decided on the
    host, without a device sync. Rows of sharded tensors come from the process that holds them: each process
    fills the rows it owns into one zeroed buffer for all requests, and one ``all_reduce`` (sum) per dtype
    completes it; only those rows travel.
    """
    import numpy as np
    import torch

    out: list[torch.Tensor | None] = []
    pieces: list[tuple[int, torch.Tensor]] = []
    for tensor, index in requests:
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        mine = local(tensor)
        if not is_sharded(tensor) or _shard_dim(tensor) is None:
            out.append(mine[index_tensor(index, mine.device)])
            continue
        if _shard_dim(tensor) != 0:
            raise RankscopeError(f"a tensor sharded along dim {_shard_dim(tensor)} found, expected dim 0 (FSDP2)")
        start, stop = local_range(tensor)
        rows = torch.zeros((index.size, *tensor.shape[1:]), dtype=tensor.dtype, device=mine.device)
        owned = np.flatnonzero((index >= start) & (index < stop))
        if owned.size:
            rows[index_tensor(owned, mine.device)] = mine[index_tensor(index[owned] - start, mine.device)]
        pieces.append((len(out), rows))
        out.append(None)
    by_dtype: dict[Any, list[int]] = {}
    for k, (_, rows) in enumerate(pieces):  # one reduction per dtype keeps every value exact
        by_dtype.setdefault(rows.dtype, []).append(k)
    for members in by_dtype.values():
        _reduce_into([pieces[k][1] for k in members], _group([requests[pieces[k][0]][0] for k in members]))
    for position, rows in pieces:
        out[position] = rows
    return out  # type: ignore[return-value]


def _reduce_into(tensors: list["torch.Tensor"], group: Any) -> None:
    import torch

    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def full_tensors(tensors: Sequence["torch.Tensor"]) -> list["torch.Tensor"]:
    """Every tensor (at least 1-D) whole, on every process, with one collective for all the sharded ones (small
    tensors only: score vectors, a few rows)."""
    return gather_rows([(t, range(t.shape[0])) for t in tensors])


def set_rows(tensor: "torch.Tensor", index: Any, values: "torch.Tensor | float") -> None:
    """``tensor[index] = values`` (rows along dim 0; ``index`` a host array), each process writing the rows it
    holds; ``values`` has one row per index (on every process) or is a number."""
    import numpy as np

    index = np.asarray(index, dtype=np.int64).reshape(-1)
    mine = local(tensor)
    start, stop = (0, tensor.shape[0]) if not is_sharded(tensor) or _shard_dim(tensor) is None else local_range(tensor)
    if is_sharded(tensor) and _shard_dim(tensor) not in (None, 0):
        raise RankscopeError(f"a tensor sharded along dim {_shard_dim(tensor)} found, expected dim 0 (FSDP2)")
    owned = np.flatnonzero((index >= start) & (index < stop))
    if not owned.size:
        return
    target = index_tensor(index[owned] - start, mine.device)
    if isinstance(values, (int, float)):
        mine[target] = values
    else:
        mine[target] = (values if owned.size == index.size else values[index_tensor(owned, values.device)]
                        ).to(mine.dtype)


def shard_like(whole: "torch.Tensor", like: "torch.Tensor") -> "torch.Tensor":
    """``whole`` (the same on every process) split as ``like`` is: a DTensor with this process's rows, or
    ``whole`` itself when ``like`` is plain."""
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import DTensor

    start, stop = local_range(like, 0) if _shard_dim(like) == 0 else (0, whole.shape[0])
    piece = whole[start:stop].to(device=local(like).device, dtype=like.dtype).contiguous()
    return DTensor.from_local(piece, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def all_reduce_sum(tensor: "torch.Tensor", like: Sequence[Any]) -> "torch.Tensor":
    """Sum ``tensor`` (plain, the same shape everywhere) over the processes that shard ``like``; in place."""
    import torch

    group = _group(like)
    if group is not None:
        torch.distributed.all_reduce(tensor, group=group)
    return tensor


def all_gather_stacked(tensor: "torch.Tensor", like: Sequence[Any]) -> "torch.Tensor":
    """``(N, *tensor.shape)``: every process's ``tensor`` (the same shape everywhere), in rank order."""
    import torch

    group = _group(like)
    if group is None:
        return tensor.unsqueeze(0)
    size = torch.distributed.get_world_size(group)
    out = torch.empty(size * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    torch.distributed.all_gather_into_tensor(out, tensor.contiguous().reshape(-1), group=group)
    return out.view(size, *tensor.shape)


__all__ = ["index_tensor", "is_sharded", "any_sharded", "local", "local_range", "columns", "gather_rows", "full_tensors", "set_rows",
           "shard_like", "all_reduce_sum", "all_gather_stacked"]
