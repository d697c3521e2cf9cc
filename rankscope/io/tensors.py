"""Reading tensor files without importing torch: safetensors one tensor at a time, pickles safely.

A safetensors file is read by its documented layout (8-byte little-endian header length, a
JSON header, then raw little-endian data). Each tensor is read when asked for, with ``os.preadv``
straight into its numpy array, so resident memory stays near the modules being analysed, never the
file. It is not memory-mapped: a mapped file cut short by another process (a copy still being
written, ``truncate``) kills the reader with SIGBUS on the first page past the new end, whereas a
read just comes back short. Every read checks that it got all its bytes and that the file's size and
modification time are still those it had when opened; if not, the file changed while it was read,
and that is one error. bfloat16 has no numpy dtype: it is widened to float32 exactly (a bf16 value
is the top half of a float32).
Pickled ``.bin`` / ``.pt`` files go through ``torch.load(weights_only=True)`` only, so no
code inside a pickle ever runs; they are read whole (not mapped, for the same reason), and only
dense CPU tensors with string names are accepted.
"""

from __future__ import annotations

import json
import math
import os
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from rankscope.errors import RankscopeError
from rankscope.io.validate import describe, is_int, loads, open_regular

# dtype name in the safetensors header -> (numpy dtype, bytes per element); BF16 stays raw.
_SAFETENSORS_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "U64": (np.dtype("<u8"), 8),
    "U32": (np.dtype("<u4"), 4),
    "U16": (np.dtype("<u2"), 2),
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
# Every dtype the safetensors format defines, in bits per element (F4 and F6 pack into bytes).
# Tensors of those numpy cannot hold (fp8, fp4, complex) are listed and checked but never decoded.
_DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}
MAX_HEADER_BYTES = 100_000_000  # the official reader's limit
_INT64_MAX, _UINT64_MAX = 2**63 - 1, 2**64 - 1
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


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return value


def _parse_header(raw: bytes, path: Path) -> dict:
    """The JSON header as a dict, refusing what the official reader refuses (and duplicate names)."""
    invalid = f"{path} is not a valid safetensors file"
    try:
        header = loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, refuse_out_of_range=True)
    except UnicodeDecodeError as e:
        raise RankscopeError(f"{invalid}: its header is not UTF-8 text (byte {e.start}), expected a JSON object") from None
    except RecursionError:
        raise RankscopeError(f"{invalid}: its header nests JSON too deeply to be a tensor index") from None
    except _DuplicateKey as e:
        raise RankscopeError(f"{invalid}: the name {str(e)!r} appears twice in its header: "
                             "expected each tensor (and each metadata key) named once") from None
    except ValueError as e:
        raise RankscopeError(f"{invalid}: its {len(raw)}-byte header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise RankscopeError(f"{invalid}: its header is {describe(header)}, expected a JSON object")
    return header


def _byte_size(shape: list[int], bits: int) -> int | None:
    """Bytes of a tensor, or None when the count overflows a 64-bit integer (the official reader's check)."""
    elements = 1
    for dim in shape:
        elements *= dim
        if elements > _UINT64_MAX:
            return None
    total_bits = elements * bits
    return None if total_bits // 8 > _INT64_MAX else total_bits // 8 if total_bits % 8 == 0 else -1


def _check_header(header: dict, path: Path, data_size: int
                  ) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, int], dict[str, str]]:
    """Shapes, dtypes, data offsets and metadata of a parsed header, checked by the format's rules.

    As the official reader: every entry has a known dtype, a shape of non-negative integers and
    integer ``data_offsets`` spanning exactly its bytes; sorted by offset, the tensors follow one
    another from byte 0 without gap or overlap and end exactly where the file ends. So no tensor
    can read another's bytes, and a truncated file is told apart from a corrupt header.
    """
    invalid = f"{path} is not a valid safetensors file"
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise RankscopeError(f"{invalid}: __metadata__ is {describe(metadata)}, expected an object of strings to strings")
    else:
        for key, value in metadata.items():
            if not isinstance(value, str):
                raise RankscopeError(f"{invalid}: __metadata__[{key!r}] is {describe(value)}, "
                                     "expected a string (safetensors metadata maps strings to strings)")
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        entry = f"{invalid}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise RankscopeError(f"{entry} is {describe(info)} without all of its fields: expected "
                                 '{"dtype": ..., "shape": [...], "data_offsets": [begin, end]}')
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:
            raise RankscopeError(f"{entry}: dtype is {describe(dtype)}, expected one of the safetensors dtypes "
                                 f"({', '.join(_DTYPE_BITS)})")
        if not isinstance(shape, list) or not all(is_int(d) and 0 <= d <= _UINT64_MAX for d in shape):
            raise RankscopeError(f"{entry}: shape is {_shown(shape)}, expected a list of non-negative 64-bit integers")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(is_int(o) and 0 <= o <= _UINT64_MAX for o in offsets)):
            raise RankscopeError(f"{entry}: data_offsets is {_shown(offsets)}, "
                                 "expected two non-negative 64-bit integers [begin, end]")
        begin, end = offsets
        if end < begin:
            raise RankscopeError(f"{entry}: data_offsets [{begin}, {end}] end before they begin")
        size = _byte_size(shape, _DTYPE_BITS[dtype])
        if size is None:
            raise RankscopeError(f"{entry}: shape {_shown(shape)} of {dtype} is too large: its byte size overflows "
                                 "a 64-bit integer")
        if size < 0:
            raise RankscopeError(f"{entry}: shape {_shown(shape)} of {dtype} does not fill a whole number of bytes")
        if end - begin != size:
            raise RankscopeError(f"{entry} ({dtype} {_shown(shape)}) takes {size} bytes, but its data_offsets "
                                 f"[{begin}, {end}] span {end - begin}")
        shapes[name], dtypes[name] = tuple(shape), dtype
        spans.append((begin, end, name))
    offsets_by_name: dict[str, int] = {}
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise RankscopeError(f"{invalid}: tensor {name!r} (data_offsets [{begin}, {end}]) overlaps tensor "
                                 f"{previous!r}, which ends at byte {position}: expected each tensor's bytes "
                                 "to begin where the previous one's end")
        if begin > position:
            after = f"tensor {previous!r}, which ends at byte {position}" if previous else "the start of the data"
            raise RankscopeError(f"{invalid}: {begin - position} bytes between {after} and tensor {name!r} "
                                 f"(data_offsets [{begin}, {end}]) belong to no tensor: expected contiguous data_offsets")
        offsets_by_name[name] = begin
        position, previous = end, name
    if position > data_size:
        raise RankscopeError(f"{path} is truncated: its tensors need {position} bytes of data "
                             f"(up to the end of {previous!r}), but the file holds only {data_size} after its header")
    if position < data_size:
        raise RankscopeError(f"{invalid}: {data_size - position} bytes after the last tensor's data belong to no "
                             "tensor: expected the data_offsets to cover the rest of the file exactly")
    return shapes, dtypes, offsets_by_name, metadata


def _shown(value: object) -> str:
    """A header value as JSON, cut short: enough to see what is wrong."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = describe(value)
    return text if len(text) <= 60 else text[:57] + "..."


_SEEK_LOCK = threading.Lock()


def _pread_into(fd: int, buffer: memoryview, offset: int) -> int:
    """Read into ``buffer`` at ``offset`` of ``fd``; the bytes read (0 at the end of the file)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], offset)
    with _SEEK_LOCK:  # no positional read on this platform: seek and read under a lock
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, min(len(buffer), 1 << 30))
    buffer[:len(data)] = data
    return len(data)


def _changed(path: Path, before: tuple[int, int], now: os.stat_result | None, where: str) -> str:
    """The one error of a file that changed under its reader (cut short, grown or rewritten) or vanished."""
    if now is None:
        what = "it could no longer be examined"
    elif now.st_size != before[0]:
        what = f"its size went from {before[0]} to {now.st_size} bytes"
    elif now.st_mtime_ns != before[1]:
        what = "it was rewritten: its modification time changed"
    else:
        what = "a read came back short"
    return (f"{path} changed while it was read ({what}; {where}): expected a file that stays as it is while "
            "rankscope reads it; run again once whatever writes it has finished")


class PositionalReads:
    """Tensors read with ``pread`` from a descriptor of the file's own (``_fd``, closed by ``_finalizer``), checked
    against the size and mtime seen when it was opened (``_stat``): shared by the safetensors and GGUF readers."""

    path: Path
    _fd: int
    _stat: tuple[int, int]
    _finalizer: Any
    FILE_KIND = "file"  # in "expected a readable ... file"

    def _unchanged(self, name: str, short: str = "") -> None:
        """Raise the one error of a file that changed since it was opened (or came back short)."""
        try:
            now: os.stat_result | None = os.fstat(self._fd)
        except OSError:
            now = None
        if short or now is None or (now.st_size, now.st_mtime_ns) != self._stat:
            raise RankscopeError(_changed(self.path, self._stat, now, f"at tensor {name!r}{short}"))

    def _read_into(self, buffer: memoryview, offset: int, name: str) -> None:
        """Fill ``buffer`` from ``offset`` with positional reads (thread-safe: no shared file position)."""
        if not self._finalizer.alive:
            raise RankscopeError(f"{self.path} was closed: tensor {name!r} can no longer be read")
        done, total = 0, len(buffer)
        while done < total:
            try:
                got = _pread_into(self._fd, buffer[done:], offset + done)
            except OSError as e:
                raise RankscopeError(f"{self.path} could not be read at tensor {name!r} "
                                     f"({e.strerror or e}): expected a readable {self.FILE_KIND}") from None
            if got == 0:
                self._unchanged(name, f", which ended after {done} of its {total} bytes")
            done += got
        self._unchanged(name)

    def close(self) -> None:
        self._finalizer()  # closes the descriptor once; arrays handed out are copies and stay valid


class SafetensorsFile(PositionalReads, TensorFile):
    """A safetensors file, validated against its own header by the format's rules, read one tensor at a time."""

    FILE_KIND = "safetensors file"

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        with open_regular(path, "a safetensors file") as f:
            stat = os.fstat(f.fileno())
            size = stat.st_size
            head = f.read(64)
            problem = _describe_non_safetensors(path, head, size)
            if problem:
                raise RankscopeError(problem)
            header_len = int.from_bytes(head[:8], "little")
            if header_len > MAX_HEADER_BYTES:
                raise RankscopeError(
                    f"{path} is not a valid safetensors file: its header length field says {header_len} bytes, "
                    f"more than the format's limit of {MAX_HEADER_BYTES:,} (a corrupt length field, or not safetensors)"
                )
            if header_len > size - 8 or header_len < 2:
                raise RankscopeError(
                    f"{path} is not a valid safetensors file: its header claims {header_len} bytes "
                    f"but the file has {size - 8} after the length field (truncated or not safetensors)"
                )
            f.seek(8)
            raw_header = f.read(header_len)
            self._stat = (stat.st_size, stat.st_mtime_ns)
            if len(raw_header) != header_len:
                raise RankscopeError(_changed(path, self._stat, os.fstat(f.fileno()), "in its header"))
            header = _parse_header(raw_header, path)
            data_start = 8 + header_len
            shapes, dtypes, self._offsets, metadata = _check_header(header, path, size - data_start)
            for name in self._offsets:
                self._offsets[name] += data_start
            # A descriptor of our own (the `with` closes f): tensors are read from it, closed with this object.
            self._fd = os.dup(f.fileno())
        self._finalizer = weakref.finalize(self, os.close, self._fd)
        super().__init__(path, shapes, dtypes, metadata)

    def __getitem__(self, name: str) -> np.ndarray:
        dtype_name = self._dtypes[name]
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise RankscopeError(f"{self.path}: tensor {name!r} has dtype {dtype_name}, which rankscope cannot read")
        np_dtype, _ = _SAFETENSORS_DTYPES[dtype_name]
        shape = self._shapes[name]
        count = math.prod(shape)
        if count == 0:
            return np.zeros(shape, dtype=np.float32 if dtype_name in _FLOAT_DTYPES else np_dtype)
        array = np.empty(shape, dtype=np_dtype)
        self._read_into(memoryview(array.reshape(-1).view(np.uint8)), self._offsets[name], name)
        return bf16_to_float32(array) if dtype_name == "BF16" else array

    def raw(self, name: str) -> bytearray:
        """The tensor's stored bytes, exactly as in the file (to copy a tensor without converting it)."""
        size = _byte_size(list(self._shapes[name]), _DTYPE_BITS[self._dtypes[name]])
        buffer = bytearray(size or 0)
        if size:
            self._read_into(memoryview(buffer), self._offsets[name], name)
        return buffer



class PickleFile(TensorFile):
    """A PyTorch pickle read with ``torch.load(weights_only=True)``: plain tensors only."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        with open_regular(path, "a PyTorch file") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(64)
        if head.startswith(b"version https://git-lfs") or size < 8:
            raise RankscopeError(_describe_non_safetensors(path, head, size).replace("a safetensors file", "a PyTorch file"))
        import pickle

        import torch  # only pickles need torch

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about pickle protocols on stderr
                # Read whole, never mapped: a mapped file cut short while it is read kills the process (SIGBUS).
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
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
        for key in state:
            if not isinstance(key, str):
                raise RankscopeError(f"{path} holds a dict with the key {repr(key)[:40]} ({type(key).__name__}): expected tensor "
                                     "names (strings) as keys, as torch.save(model.state_dict()) writes them")
        self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        super().__init__(
            path,
            {k: tuple(v.shape) for k, v in self._tensors.items()},
            {k: _torch_dtype_name(v) for k, v in self._tensors.items()},
            {},
        )

    def __getitem__(self, name: str) -> np.ndarray:
        import torch

        dtype = self._dtypes[name]
        if dtype not in _SAFETENSORS_DTYPES:
            raise RankscopeError(f"{self.path}: tensor {name!r} is {dtype}, which rankscope cannot read: expected a "
                                 "dense tensor of a floating or integer dtype")
        tensor = self._tensors[name].detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        try:
            return tensor.numpy()
        except (TypeError, RuntimeError) as e:
            raise RankscopeError(f"{self.path}: tensor {name!r} ({dtype}) cannot be read as numbers ({e})") from None


_TORCH_DTYPES = {  # torch dtype name -> the safetensors name, for every dtype both know
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e8m0fnu": "F8_E8M0", "complex64": "C64",
}


def _torch_dtype_name(tensor) -> str:
    """The tensor's dtype as safetensors names it (``F32``, ``I8``, ``F8_E4M3``), or what it is in words when it
    is not a plain dense tensor with data (``sparse_coo F32``, ``quantized qint8``, ``meta F16 (no data)``)."""
    import torch  # only pickles need torch

    name = str(tensor.dtype).removeprefix("torch.")
    dtype = _TORCH_DTYPES.get(name, name)
    if tensor.is_quantized:
        return f"quantized {name}"
    if tensor.layout is not torch.strided:
        return f"{str(tensor.layout).removeprefix('torch.')} {dtype}"
    if tensor.is_meta:
        return f"meta {dtype} (no data)"
    return dtype


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


def encode_safetensors(tensors: dict[str, tuple[str, tuple[int, ...], bytes]],
                       metadata: dict[str, str] | None = None) -> list[bytes]:
    """A safetensors file from ``{name: (dtype, shape, raw bytes)}`` as the chunks to write in order: the
    8-byte header length, a JSON header padded to 8 bytes, then each tensor's data (never joined: a resized
    7B adapter would be held twice). Offsets are contiguous in name order, as the official writer lays them out.
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
    return [len(encoded).to_bytes(8, "little"), encoded, *chunks]


def open_tensor_file(path: str | os.PathLike) -> TensorFile:
    """Open a ``.safetensors`` file or a PyTorch pickle (``.bin``, ``.pt``, ``.pth``, ``.ckpt``)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        return PickleFile(path)
    return SafetensorsFile(path)
