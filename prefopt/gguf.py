"""Reader for GGUF v3 (and v2, identical on little-endian) model files, over mmap.

Layout (llama.cpp docs/gguf.md): magic ``GGUF``, u32 version, u64 tensor count,
u64 kv count; the key/value metadata (typed values, strings as u64 length +
bytes); the tensor infos (name, u32 n_dims <= 4, u64 ne[n_dims] with ne[0]
fastest, u32 ggml type, u64 offset relative to the data section); then the data
section at the next multiple of ``general.alignment`` (default 32).

Every read is bounds-checked: a cut or corrupt file raises ``ValueError`` naming
the file and the problem, never reads past the end. Tensor data is dequantised
to float32 in the C core (``prefopt._core.dequantize``).

    g = GGUFFile("model.gguf")
    g.metadata["llama.block_count"]       # plain Python values
    g.tensors["blk.0.attn_q.weight"]      # GGUFTensorInfo (shape in PyTorch order)
    w = g.tensor("blk.0.attn_q.weight")   # float32 ndarray, PyTorch shape
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from . import _core
from ._mmapfile import MmapBacked

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ELEMENTS = 2**31          # per tensor; larger is treated as corrupt
MAX_NAME_BYTES = 65535        # keys and tensor names
MAX_ARRAY_DEPTH = 8           # nested arrays (allowed by the spec, never seen in practice)

# KV value types: id -> (name, numpy dtype or None for string/array)
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = 8, 9, 10, 11, 12
_SCALAR_DTYPES = {
    T_UINT8: np.dtype("<u1"), T_INT8: np.dtype("<i1"), T_UINT16: np.dtype("<u2"),
    T_INT16: np.dtype("<i2"), T_UINT32: np.dtype("<u4"), T_INT32: np.dtype("<i4"),
    T_FLOAT32: np.dtype("<f4"), T_BOOL: np.dtype("<u1"), T_UINT64: np.dtype("<u8"),
    T_INT64: np.dtype("<i8"), T_FLOAT64: np.dtype("<f8"),
}
VALUE_TYPE_NAMES = {
    T_UINT8: "UINT8", T_INT8: "INT8", T_UINT16: "UINT16", T_INT16: "INT16",
    T_UINT32: "UINT32", T_INT32: "INT32", T_FLOAT32: "FLOAT32", T_BOOL: "BOOL",
    T_STRING: "STRING", T_ARRAY: "ARRAY", T_UINT64: "UINT64", T_INT64: "INT64",
    T_FLOAT64: "FLOAT64",
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor record. ``shape`` is the PyTorch shape (``ne`` reversed)."""

    name: str
    ne: tuple            # ggml order, ne[0] fastest
    ggml_type: int
    type_name: str
    offset: int          # absolute byte offset of the data in the file
    nbytes: int

    @property
    def shape(self) -> tuple:
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; errors name the file."""

    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str):
        raise ValueError(f"{self.path}: corrupt GGUF file: {what}")

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file has "
                      f"{self.size - self.pos} left (file size {self.size}); truncated?")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def u32(self, what):
        return self.unpack("<I", what)

    def u64(self, what):
        return self.unpack("<Q", what)

    def string(self, what: str, max_len: int | None = None) -> str:
        n = self.u64(f"length of {what}")
        if max_len is not None and n > max_len:
            self.fail(f"{what} has absurd length {n} (limit {max_len})")
        self.need(n, f"{what} ({n} bytes)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})")

    def array_of(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        if count > (self.size - self.pos) // dtype.itemsize:
            self.fail(f"{what}: {count} elements of {dtype.itemsize} bytes do not fit in the "
                      f"{self.size - self.pos} bytes left (file size {self.size})")
        a = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * dtype.itemsize
        return a


def _read_value(cur: _Cursor, vtype: int, key: str, depth: int = 0):
    if vtype in _SCALAR_DTYPES:
        dt = _SCALAR_DTYPES[vtype]
        v = cur.array_of(dt, 1, f"value of {key!r}")[0]
        if vtype == T_BOOL:
            if v > 1:
                cur.fail(f"bool value of {key!r} is {int(v)}, not 0 or 1")
            return bool(v)
        return v.item()
    if vtype == T_STRING:
        return cur.string(f"string value of {key!r}")
    if vtype == T_ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            cur.fail(f"arrays nested deeper than {MAX_ARRAY_DEPTH} in {key!r}")
        etype = cur.u32(f"element type of array {key!r}")
        count = cur.u64(f"element count of array {key!r}")
        if etype in _SCALAR_DTYPES:
            a = cur.array_of(_SCALAR_DTYPES[etype], count, f"array {key!r}")
            if etype == T_BOOL:
                if count and a.max() > 1:
                    cur.fail(f"bool array {key!r} holds a value other than 0 or 1")
                return [bool(x) for x in a]
            return a.tolist()
        if etype == T_STRING or etype == T_ARRAY:
            min_elem = 8 if etype == T_STRING else 12
            if count > (cur.size - cur.pos) // min_elem:
                cur.fail(f"array {key!r} claims {count} elements, which cannot fit in the "
                         f"{cur.size - cur.pos} bytes left (file size {cur.size})")
            if etype == T_STRING:
                return [cur.string(f"element {i} of array {key!r}") for i in range(count)]
            return [_read_value(cur, T_ARRAY, f"{key}[{i}]", depth + 1) for i in range(count)]
        cur.fail(f"array {key!r} has unknown element type {etype}")
    cur.fail(f"key {key!r} has unknown value type {vtype} (known: 0-12)")


class GGUFFile(MmapBacked):
    """A parsed GGUF file. Attributes: ``path``, ``version``, ``metadata`` (dict of
    plain Python values), ``value_types`` (key -> GGUF value type id), ``tensors``
    (dict name -> GGUFTensorInfo, file order), ``alignment``, ``data_offset``."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise FileNotFoundError(f"{self.path}: cannot open GGUF file: {e.strerror}") from None
        if size < 24:
            raise ValueError(f"{self.path}: corrupt GGUF file: {size} bytes is too short for "
                             f"the 24-byte header")
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        try:
            self._parse()
        except Exception:
            self.close()
            raise

    # -- parsing ---------------------------------------------------------------------
    def _parse(self):
        cur = _Cursor(self._mm, self.size, self.path)
        magic = bytes(self._mm[0:4])
        if magic != GGUF_MAGIC:
            raise ValueError(f"{self.path}: not a GGUF file: magic is {magic!r}, expected b'GGUF'")
        cur.pos = 4
        version = cur.u32("version")
        if version & 0xFFFF == 0 and version != 0:
            raise ValueError(f"{self.path}: big-endian GGUF files are not supported "
                             f"(version field {version:#x})")
        if version not in (2, 3):
            raise ValueError(f"{self.path}: unsupported GGUF version {version} (prefopt reads v2/v3)")
        self.version = version
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("kv count")
        # each kv needs >= 8 (key length) + 4 (type) + 1 bytes; each tensor info >= 8+4+8+4+8
        if n_kv > (self.size - cur.pos) // 13:
            cur.fail(f"kv count {n_kv} cannot fit in a file of {self.size} bytes")
        if n_tensors > (self.size - cur.pos) // 32:
            cur.fail(f"tensor count {n_tensors} cannot fit in a file of {self.size} bytes")

        self.metadata, self.value_types = {}, {}
        for i in range(n_kv):
            key = cur.string(f"key of kv {i}", MAX_NAME_BYTES)
            if not key:
                cur.fail(f"kv {i} has an empty key")
            if key in self.metadata:
                cur.fail(f"duplicate key {key!r}")
            vtype = cur.u32(f"value type of {key!r}")
            self.metadata[key] = _read_value(cur, vtype, key)
            self.value_types[key] = vtype

        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if "general.alignment" in self.metadata and (
                self.value_types["general.alignment"] != T_UINT32 or align <= 0
                or align & (align - 1)):
            cur.fail(f"general.alignment must be a power-of-two u32, got {align!r}")
        self.alignment = align

        infos = []
        names = set()
        for i in range(n_tensors):
            name = cur.string(f"name of tensor {i}", MAX_NAME_BYTES)
            if name in names:
                cur.fail(f"duplicate tensor name {name!r}")
            names.add(name)
            n_dims = cur.u32(f"n_dims of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                cur.fail(f"tensor {name!r} has n_dims {n_dims} (must be 1..{MAX_DIMS})")
            ne = tuple(cur.u64(f"dim {d} of tensor {name!r}") for d in range(n_dims))
            n = 1
            for d in ne:
                if d < 1 or d > MAX_ELEMENTS:
                    cur.fail(f"tensor {name!r} has absurd dims {list(ne)}")
                n *= d
            if n > MAX_ELEMENTS:
                cur.fail(f"tensor {name!r} has {n} elements (dims {list(ne)}), more than 2^31")
            gtype = cur.u32(f"ggml type of tensor {name!r}")
            offset = cur.u64(f"offset of tensor {name!r}")
            infos.append((name, ne, gtype, offset, n))

        self.data_offset = -(-cur.pos // align) * align
        if n_tensors and self.data_offset > self.size:
            cur.fail(f"data section starts at {self.data_offset}, past the end of the file "
                     f"({self.size} bytes)")
        self.tensors = {}
        for name, ne, gtype, offset, n in infos:
            try:
                tname, belems, bbytes = _core.ggml_type_info(gtype)
            except ValueError as e:
                raise ValueError(f"{self.path}: tensor {name!r}: {e}") from None
            if ne[0] % belems:
                cur.fail(f"tensor {name!r}: row length {ne[0]} is not a multiple of the "
                         f"{tname} block size {belems}")
            nbytes = n // belems * bbytes
            if offset % align:
                cur.fail(f"tensor {name!r}: offset {offset} is not a multiple of the "
                         f"alignment {align}")
            start = self.data_offset + offset
            if start + nbytes > self.size:
                cur.fail(f"tensor {name!r}: data [{start}, {start + nbytes}) runs past the end "
                         f"of the file ({self.size} bytes)")
            self.tensors[name] = GGUFTensorInfo(name, ne, gtype, tname, start, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                cur.fail(f"tensors {an!r} and {bn!r} overlap")

    # -- access ----------------------------------------------------------------------
    def _info(self, name) -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name) -> np.ndarray:
        """The stored bytes of a tensor (uint8 view into the mmap, no copy)."""
        t = self._info(name)
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def tensor(self, name) -> np.ndarray:
        """A tensor dequantised to a new float32 array of its PyTorch shape."""
        t = self._info(name)
        return _core.dequantize(t.ggml_type, self.raw(name), t.n_elements).reshape(t.shape)


    def __repr__(self):
        arch = self.metadata.get("general.architecture", "?") if hasattr(self, "metadata") else "?"
        return f"GGUFFile({self.path!r}, arch={arch!r}, {len(getattr(self, 'tensors', {}))} tensors)"


def read_gguf(path) -> GGUFFile:
    """Parse a GGUF file (see GGUFFile)."""
    return GGUFFile(path)
