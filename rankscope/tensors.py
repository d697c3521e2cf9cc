"""Reading tensor files without importing torch: safetensors through mmap, pickles safely.

A safetensors file is read by its documented layout (8-byte little-endian header length, a
JSON header, then raw little-endian data), memory-mapped, so tensors are zero-copy numpy
views and a 300 MB checkpoint costs no more than its pages in the page cache. bfloat16 has
no numpy dtype: it is widened to float32 exactly (a bf16 value is the top half of a float32),
and the pages it was copied from are unmapped again, so resident memory stays near one module.
Pickled ``.bin`` / ``.pt`` files go through ``torch.load(weights_only=True)`` only, so no
code inside a pickle ever runs.
"""

from __future__ import annotations

import json
import mmap
import os
import warnings
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from .errors import RankscopeError

# dtype name in the safetensors header -> (numpy dtype, bytes per element); BF16 stays raw.
_SAFETENSORS_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32 exactly."""
    wide = raw.astype(np.uint32)
    np.left_shift(wide, 16, out=wide)  # in place: one temporary fewer
    return wide.view(np.float32)


def _describe_non_safetensors(path: Path, head: bytes, size: int) -> str | None:
    """Name the common things published in place of weights, or None."""
    if head.startswith(b"version https://git-lfs"):
        return (
            f"{path} is a Git LFS pointer file ({size} bytes), not the weights: "
            "expected a safetensors file; fetch the real file with `git lfs pull`"
        )
    if size < 8:
        return (
            f"{path} is {size} bytes: too small to be a safetensors file "
            "(expected an 8-byte header length, a JSON header and tensor data)"
        )
    if head[8:9] == b"{":
        return None  # a JSON header where safetensors puts it (its length may well start with byte 0x80)
    if head[:1] == b"\x80" or head.startswith(b"PK\x03\x04"):
        return f"{path} looks like a pickled PyTorch file, not safetensors: rename it to .bin or .pt"
    return None


class TensorFile(Mapping[str, np.ndarray]):
    """Read-only mapping from tensor name to a numpy array (float tensors as float32/64/16).

    ``shape(name)`` and ``dtype(name)`` answer from the header without touching the data.
    """

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str],
                 metadata: dict[str, str]):
        self.path = path
        self._shapes = shapes
        self._dtypes = dtypes
        self.metadata = metadata

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        """The stored dtype, as safetensors names it (``BF16``, ``F32``, ...)."""
        return self._dtypes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def __getitem__(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SafetensorsFile(TensorFile):
    """A memory-mapped safetensors file, validated against its own header."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
            problem = _describe_non_safetensors(path, head, size)
            if problem:
                raise RankscopeError(problem)
            header_len = int.from_bytes(head[:8], "little")
            if header_len > size - 8 or header_len < 2:
                raise RankscopeError(
                    f"{path} is not a valid safetensors file: its header claims {header_len} bytes "
                    f"but the file has {size - 8} after the length field (truncated or not safetensors)"
                )
            f.seek(8)
            raw_header = f.read(header_len)
            try:
                header = json.loads(raw_header)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise RankscopeError(
                    f"{path} is not a valid safetensors file: its {header_len}-byte header is not JSON"
                ) from None
            if not isinstance(header, dict):
                raise RankscopeError(f"{path} is not a valid safetensors file: its header is not a JSON object")
            metadata = header.pop("__metadata__", None) or {}
            data_start = 8 + header_len
            data_size = size - data_start
            shapes, dtypes, self._offsets = {}, {}, {}
            for name, info in header.items():
                try:
                    dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
                except (KeyError, TypeError, ValueError):
                    raise RankscopeError(
                        f"{path} is not a valid safetensors file: tensor {name!r} has a malformed header entry"
                    ) from None
                if dtype not in _SAFETENSORS_DTYPES:
                    # Tensors we cannot read (fp8, complex) are listed but never decoded.
                    shapes[name], dtypes[name] = shape, dtype
                    continue
                expected = int(np.prod(shape, dtype=np.int64)) * _SAFETENSORS_DTYPES[dtype][1]
                if end - begin != expected or begin < 0:
                    raise RankscopeError(
                        f"{path} is corrupt: tensor {name!r} ({dtype} {list(shape)}) should take {expected} bytes, "
                        f"its offsets give {end - begin}"
                    )
                if end > data_size:
                    raise RankscopeError(
                        f"{path} is truncated: tensor {name!r} ends at byte {end} of the data section, "
                        f"which holds only {data_size} bytes"
                    )
                shapes[name], dtypes[name] = shape, dtype
                self._offsets[name] = data_start + begin
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > data_start else None
        super().__init__(path, shapes, dtypes, metadata)

    def __getitem__(self, name: str) -> np.ndarray:
        dtype_name = self._dtypes[name]
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise RankscopeError(f"{self.path}: tensor {name!r} has dtype {dtype_name}, which rankscope cannot read")
        np_dtype, _ = _SAFETENSORS_DTYPES[dtype_name]
        shape = self._shapes[name]
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.zeros(shape, dtype=np.float32 if dtype_name in _FLOAT_DTYPES else np_dtype)
        offset = self._offsets[name]
        array = np.frombuffer(self._mmap, dtype=np_dtype, count=count, offset=offset).reshape(shape)
        if dtype_name != "BF16":
            return array  # a zero-copy view: its pages stay mapped while the file is open
        widened = bf16_to_float32(array)
        del array
        self._release(offset, count * 2)
        return widened

    def raw(self, name: str) -> bytes:
        """The tensor's stored bytes, exactly as in the file (to copy a tensor without converting it)."""
        shape = self._shapes[name]
        size = int(np.prod(shape, dtype=np.int64)) * _SAFETENSORS_DTYPES[self._dtypes[name]][1]
        offset = self._offsets[name]
        return bytes(self._mmap[offset:offset + size]) if size else b""

    def _release(self, offset: int, length: int) -> None:
        """Unmap pages already copied out, so a snapshot's resident memory stays small.

        The map is read-only and file-backed: dropped pages are read again from the page cache
        if anything touches them (a view handed out earlier stays valid), so this is always safe.
        """
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset - offset % mmap.PAGESIZE
        try:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, offset + length - start)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        # Arrays handed out may still view the map; let garbage collection unmap it.
        self._mmap = None


class PickleFile(TensorFile):
    """A PyTorch pickle read with ``torch.load(weights_only=True)``: plain tensors only."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
        if head.startswith(b"version https://git-lfs") or size < 8:
            raise RankscopeError(_describe_non_safetensors(path, head, size).replace("a safetensors file", "a PyTorch file"))
        import pickle

        import torch  # only pickles need torch

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about pickle protocols on stderr
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK"))
        except pickle.UnpicklingError as e:
            # torch's message is long; the line naming the refused global is the one that matters.
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            culprit = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
            raise RankscopeError(
                f"{path} is a pickle that asks for more than plain tensors ({culprit[:160]}); "
                "refusing to load it: only weights_only pickles of tensors are read, and no code inside them is run"
            ) from None
        except Exception as e:  # torch raises RuntimeError / EOFError / zipfile errors on bad files
            raise RankscopeError(
                f"{path} could not be read as a PyTorch pickle ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no detail'}); "
                "expected a state dict of tensors saved by torch.save"
            ) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]  # Lightning-style wrapper
        if not isinstance(state, dict):
            raise RankscopeError(f"{path} holds a {type(state).__name__}, expected a dict of tensors")
        self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        dtype_names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
        super().__init__(
            path,
            {k: tuple(v.shape) for k, v in self._tensors.items()},
            {k: dtype_names.get(v.dtype, str(v.dtype).removeprefix("torch.")) for k, v in self._tensors.items()},
            {},
        )

    def __getitem__(self, name: str) -> np.ndarray:
        import torch

        tensor = self._tensors[name].detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.numpy()


def float_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float values to bfloat16 (nearest, ties to even, as torch does), returned as raw uint16 bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # keep NaN a NaN (rounding could carry it into Inf)
        out[nan] = 0x7FC0
    return out


def encode_tensor(array: np.ndarray, dtype: str) -> bytes:
    """``array`` stored as safetensors dtype ``dtype`` (F64, F32, F16 or BF16), little-endian bytes."""
    if dtype == "BF16":
        return float_to_bf16_bits(array).tobytes()
    if dtype not in ("F64", "F32", "F16"):
        raise RankscopeError(f"cannot write dtype {dtype}: expected F64, F32, F16 or BF16")
    return np.ascontiguousarray(array, dtype=_SAFETENSORS_DTYPES[dtype][0]).tobytes()


def encode_safetensors(tensors: dict[str, tuple[str, tuple[int, ...], bytes]], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file from ``{name: (dtype, shape, raw bytes)}``: a JSON header padded to 8 bytes, then the data.

    Offsets are contiguous in name order, as the official writer lays them out.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset, chunks = 0, []
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        expected = int(np.prod(shape, dtype=np.int64)) * _SAFETENSORS_DTYPES[dtype][1]
        if len(data) != expected:
            raise RankscopeError(f"tensor {name!r} ({dtype} {list(shape)}) has {len(data)} bytes, expected {expected}")
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks)


def open_tensor_file(path: str | os.PathLike) -> TensorFile:
    """Open a ``.safetensors`` file or a PyTorch pickle (``.bin``, ``.pt``, ``.pth``, ``.ckpt``)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        return PickleFile(path)
    return SafetensorsFile(path)
