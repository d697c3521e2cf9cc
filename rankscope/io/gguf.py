"""Reading and writing GGUF files (llama.cpp's format) with the ``gguf`` package, llama.cpp's own library.

The header (key/value fields and tensor infos) is parsed by :class:`gguf.GGUFReader` (over its memory map,
touching only the header's pages, and dropped before any tensor is read), kept from ever reading past the
end of the file or looping over a count the file cannot hold. The tensor infos are then
checked by the rules of ggml's own loader (``gguf_init_from_file``): a known type, at most 4 dimensions,
rows of whole blocks, and data offsets laid out one after another, each padded to the alignment, inside
the file. Tensor data is read when asked for with positional reads (never memory-mapped: a mapped file
cut short while it is read kills the reader with SIGBUS), so resident memory stays near the module being
analysed. F32, F16, BF16 and F64 are read exactly; Q8_0 is dequantised with ``gguf.quants`` (a float16
block scale times an int8, exact in float32). Any other type is refused by name when it is read.

GGUF stores dimensions innermost first (ggml's ``ne``); shapes here are numpy's, outermost first, as
``GGUFReader`` gives them.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rankscope.errors import RankscopeError
from rankscope.io.atomic import write_with
from rankscope.io.tensors import PositionalReads, TensorFile, bf16_to_float32
from rankscope.io.validate import open_regular

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
GGML_MAX_DIMS = 4  # ggml's limit on a tensor's dimensions
READABLE_TYPES = ("F32", "F16", "BF16", "F64", "Q8_0")  # read exactly (Q8_0: exactly the stored values)
_HEADER_MIN = 24  # magic, version, tensor count, key/value count


def is_gguf(path: Path) -> bool:
    """``path`` is named ``.gguf``, or is a regular file that begins with the GGUF magic (never raises, never blocks)."""
    if path.suffix.lower() == GGUF_SUFFIX:
        return True
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # never open a FIFO (it would block) or a device
            return False
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


class _PastEnd(Exception):
    def __init__(self, offset: int, size: int):
        super().__init__(offset, size)
        self.offset, self.size = offset, size


@dataclass
class GgufField:
    """One key/value field as stored: its value (a Python scalar, string or list) and its GGUF types."""

    key: str
    value: Any
    type: Any  # gguf.GGUFValueType
    sub_type: Any = None  # the element type of an array
    nested: bool = False  # an array of arrays (kept, never rewritten)


def _bounded_reader_class():
    import gguf  # the one GGUF parser; imported where GGUF is read

    class BoundedReader(gguf.GGUFReader):
        """GGUFReader that refuses to read past the end, or to loop over an array the file cannot hold."""

        def _get(self, offset, dtype, count=1, override_order=None):
            count = int(count)
            size = np.dtype(dtype).itemsize * count
            if offset < 0 or count < 0 or offset + size > len(self.data):
                raise _PastEnd(int(offset), size)
            return super()._get(offset, dtype, count, override_order)

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type == gguf.GGUFValueType.ARRAY:
                item = int(self._get(orig_offs, np.uint32)[0])
                count = int(self._get(orig_offs + 4, np.uint64)[0])
                scalar = self.gguf_scalar_to_np.get(item)
                least = (np.dtype(scalar).itemsize if scalar else 8 if item == gguf.GGUFValueType.STRING
                         else 12 if item == gguf.GGUFValueType.ARRAY else 1)
                if count * least > len(self.data) - orig_offs - 12:
                    raise _PastEnd(orig_offs + 12, count * least)
            return super()._get_field_parts(orig_offs, raw_type)

        def _build_tensors(self, start_offs, fields):
            self.tensor_fields = fields  # checked and read by GgufFile, never mapped here

    return BoundedReader


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


class GgufFile(PositionalReads, TensorFile):
    """A GGUF file: its key/value fields (``metadata``, ``fields``) and its tensors, read one at a time."""

    FILE_KIND = "GGUF file"

    def __init__(self, path: str | os.PathLike):
        import gguf  # the one GGUF parser; imported where GGUF is read

        path = Path(path)
        self.path = path
        invalid = f"{path} is not a valid GGUF file"
        with open_regular(path, "a GGUF file") as f:
            info = os.fstat(f.fileno())
            size = info.st_size
            head = f.read(_HEADER_MIN)
            if head.startswith(b"version https://git-lfs"):
                raise RankscopeError(f"{path} is a Git LFS pointer file ({size} bytes), not the weights: expected a "
                                     "GGUF file; fetch the real file with `git lfs pull`")
            if head[:4] != GGUF_MAGIC:
                raise RankscopeError(f"{invalid}: it begins with {head[:4]!r}, expected the GGUF magic b'GGUF'")
            if size < _HEADER_MIN:
                raise RankscopeError(f"{path} is {size} bytes: too small to be a GGUF file (expected at least a "
                                     f"{_HEADER_MIN}-byte header)")
            if int.from_bytes(head[4:8], "little") & 0xFFFF == 0:
                raise RankscopeError(f"{path} is a big-endian GGUF file: rankscope reads little-endian GGUF files "
                                     "(what convert_lora_to_gguf.py writes unless given --bigendian)")
            tensors, kvs = int.from_bytes(head[8:16], "little"), int.from_bytes(head[16:24], "little")
            if tensors > size // 24 or kvs > size // 12:  # each tensor info takes ≥ 24 bytes, each field ≥ 12
                raise RankscopeError(f"{invalid}: its header counts {tensors} tensors and {kvs} key/value fields, more "
                                     f"than a {size}-byte file can hold (a corrupt count, or a truncated file)")
            self._stat = (info.st_size, info.st_mtime_ns)
            try:
                reader = _bounded_reader_class()(f)
            except _PastEnd as e:
                raise RankscopeError(f"{path} is truncated or its header is corrupt: a header field at byte {e.offset} "
                                     f"needs {e.size} bytes, but the file has {size}") from None
            except (ValueError, KeyError, IndexError, TypeError, OverflowError, RecursionError) as e:
                raise RankscopeError(f"{invalid}: its header could not be parsed ({_one_line(e)})") from None
            try:
                self.fields = _fields(reader, gguf)
            except (ValueError, IndexError, TypeError, OverflowError) as e:
                raise RankscopeError(f"{invalid}: a key/value field could not be read ({_one_line(e)})") from None
            shapes, types, self._offsets, self._nbytes = _tensor_infos(reader, gguf, path, size)
            self.alignment = int(reader.alignment)
            del reader  # drops the memory map: only the header was ever touched
            self._fd = os.dup(f.fileno())
        self._finalizer = weakref.finalize(self, os.close, self._fd)
        metadata = {field.key: field.value for field in self.fields}
        super().__init__(path, shapes, types, metadata)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes (uint8), exactly as in the file."""
        buffer = np.empty(self._nbytes[name], dtype=np.uint8)
        if buffer.size:
            self._read_into(memoryview(buffer), self._offsets[name], name)
        return buffer

    def __getitem__(self, name: str) -> np.ndarray:
        kind, shape = self._dtypes[name], self._shapes[name]
        if kind not in READABLE_TYPES:
            raise RankscopeError(f"{self.path}: tensor {name!r} is stored as {kind}, which rankscope does not read: "
                                 f"expected {', '.join(READABLE_TYPES[:-1])} or {READABLE_TYPES[-1]} (read exactly)")
        raw = self.raw(name)
        if kind == "Q8_0":
            import gguf  # dequantisation by llama.cpp's own code
            from gguf.quants import quant_shape_to_byte_shape

            qtype = gguf.GGMLQuantizationType.Q8_0
            return gguf.quants.dequantize(raw.reshape(quant_shape_to_byte_shape(shape, qtype)), qtype)
        if kind == "BF16":
            return bf16_to_float32(raw.view("<u2")).reshape(shape)
        return raw.view({"F32": "<f4", "F16": "<f2", "F64": "<f8"}[kind]).reshape(shape)


def _fields(reader: Any, gguf: Any) -> list[GgufField]:
    """The key/value fields in file order, as Python values (GGUF.* entries are the header's counts: left out)."""
    out = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        vtype = gguf.GGUFValueType(int(field.types[0])) if field.types else gguf.GGUFValueType(int(field.parts[2][0]))
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = gguf.GGUFValueType(int(field.parts[3][0]))
            nested = sub == gguf.GGUFValueType.ARRAY
            value = field.contents() if field.data and not nested else []
            out.append(GgufField(key, value, vtype, sub, nested))
        else:
            out.append(GgufField(key, field.contents(), vtype))
    return out


def _tensor_infos(reader: Any, gguf: Any, path: Path, size: int) -> tuple[dict, dict, dict, dict]:
    """Shapes (numpy order), type names, absolute data offsets and byte sizes, checked as ggml's loader does."""
    invalid = f"{path} is not a valid GGUF file"
    shapes: dict[str, tuple[int, ...]] = {}
    types: dict[str, str] = {}
    offsets: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    alignment, expected = int(reader.alignment), 0
    for field in reader.tensor_fields:
        _, name_data, n_dims, dims, raw_type, offset = field.parts
        try:
            name = bytes(name_data).decode("utf-8")
        except UnicodeDecodeError:
            raise RankscopeError(f"{invalid}: a tensor name is not UTF-8 text ({bytes(name_data)[:40]!r})") from None
        if name in shapes:
            raise RankscopeError(f"{invalid}: the tensor name {name!r} appears twice: expected each tensor named once")
        ne = [int(d) for d in dims]
        if not 1 <= int(n_dims[0]) <= GGML_MAX_DIMS:
            raise RankscopeError(f"{invalid}: tensor {name!r} has {int(n_dims[0])} dimensions, expected 1 to "
                                 f"{GGML_MAX_DIMS}")
        code = int(raw_type[0])
        try:
            qtype = gguf.GGMLQuantizationType(code)
        except ValueError:
            raise RankscopeError(f"{invalid}: tensor {name!r} has type {code}, which is not a ggml tensor type "
                                 "(expected F32, F16, BF16 or Q8_0 for a LoRA adapter)") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if ne[0] % block:
            raise RankscopeError(f"{invalid}: tensor {name!r} ({qtype.name}) has rows of {ne[0]} values, not a whole "
                                 f"number of its {block}-value blocks")
        count = math.prod(ne)
        length = count // block * type_size
        if int(offset[0]) != expected:
            raise RankscopeError(f"{invalid}: tensor {name!r} says its data begins at byte {int(offset[0])} of the data "
                                 f"section, expected {expected} (each tensor's data follows the previous one's, padded "
                                 f"to {alignment} bytes)")
        begin = reader.data_offset + expected
        if begin + length > size:
            raise RankscopeError(f"{path} is truncated: tensor {name!r} ({qtype.name} {list(reversed(ne))}) needs bytes "
                                 f"{begin} to {begin + length}, but the file has {size}")
        shapes[name], types[name], offsets[name], nbytes[name] = tuple(reversed(ne)), qtype.name, begin, length
        expected += -(-length // alignment) * alignment
    return shapes, types, offsets, nbytes


def write_gguf(path: Path, arch: str, fields: list[GgufField], tensors: list[tuple[str, np.ndarray, str]],
               alignment: int | None = None) -> None:
    """Write a GGUF file with :class:`gguf.GGUFWriter`: ``fields`` in order (``general.architecture`` from ``arch``),
    then ``tensors`` as (name, array, type name): float arrays for F32/F16/F64, raw uint16 bits for BF16, raw bytes
    (uint8, numpy byte shape) for any other type. Atomically, through :func:`rankscope.io.atomic.write_with`."""
    import gguf  # the one GGUF writer

    for field in fields:
        if field.type == gguf.GGUFValueType.ARRAY and (field.nested or not field.value):
            what = "an array of arrays" if field.nested else "an empty array"
            raise RankscopeError(f"{path.name}: key/value field {field.key!r} is {what}, which gguf's writer cannot write "
                                 "back: expected fields of scalars, strings or non-empty arrays of them")

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(None, arch)
        try:
            if alignment is not None and alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
                writer.add_custom_alignment(alignment)
            for field in fields:
                if field.key in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.ALIGNMENT):
                    continue
                writer.add_key_value(field.key, field.value, field.type, field.sub_type)
            for name, array, kind in tensors:
                qtype = gguf.GGMLQuantizationType[kind]
                if kind in ("F32", "F16", "F64"):
                    writer.add_tensor(name, np.ascontiguousarray(array, dtype={"F32": "<f4", "F16": "<f2", "F64": "<f8"}[kind]))
                else:
                    writer.add_tensor(name, np.ascontiguousarray(array), raw_dtype=qtype)
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        except (ValueError, TypeError, OverflowError, struct.error) as e:  # a field gguf's writer cannot pack
            raise RankscopeError(f"{path.name} could not be written as GGUF ({_one_line(e)})") from None
        finally:
            writer.close()

    write_with(path, fill)
