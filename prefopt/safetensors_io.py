"""Reader for Hugging Face safetensors checkpoints (single file or sharded), over mmap.

Format: u64 little-endian header length N, N bytes of UTF-8 JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data buffer; offsets are relative to the buffer start (byte 8 + N).
Every header is validated against the file size before any data is touched;
problems raise ``ValueError`` naming the file and the problem. F32, F16 and
BF16 tensors convert to float32; other dtypes raise ``ValueError`` naming them.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from . import _core
from ._mmapfile import MmapBacked

MAX_HEADER_BYTES = 100 * 1024 * 1024   # the format's own cap
# dtype -> bytes per element (all dtypes the format defines, so sizes can be checked)
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("F32", "F16", "BF16")
_GGML_OF = {"F32": 0, "F16": 1, "BF16": 30}   # dequantised by the same C code as GGUF


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey(k)
        d[k] = v
    return d


@dataclass(frozen=True)
class SafetensorsEntry:
    name: str
    dtype: str
    shape: tuple
    offset: int     # absolute byte offset in the file
    nbytes: int


class SafetensorsFile(MmapBacked):
    """One .safetensors file: ``entries`` (name -> SafetensorsEntry), ``metadata``."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise FileNotFoundError(f"{self.path}: cannot open safetensors file: {e.strerror}") from None
        self.size = size
        if size < 8:
            self._fail(f"{size} bytes is too short for the 8-byte header length")
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except Exception:
            self.close()
            raise

    def _fail(self, what):
        raise ValueError(f"{self.path}: corrupt safetensors file: {what}")

    def _parse(self):
        (n,) = struct.unpack_from("<Q", self._mm, 0)
        if n > MAX_HEADER_BYTES:
            self._fail(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > self.size:
            self._fail(f"header length {n} runs past the end of the file ({self.size} bytes)")
        raw = bytes(self._mm[8:8 + n])
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._fail(f"header is not valid JSON ({e})")
        except _DuplicateKey as e:
            self._fail(f"header has duplicate key {e.args[0]!r}")
        if not isinstance(header, dict):
            self._fail(f"header is a JSON {type(header).__name__}, expected an object")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            self._fail("__metadata__ is not an object")
        data_start, data_len = 8 + n, self.size - 8 - n
        self.entries = {}
        for name, e in header.items():
            where = f"tensor {name!r}"
            if not isinstance(e, dict):
                self._fail(f"{where}: entry is not an object")
            dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
            if dtype not in DTYPE_SIZES:
                self._fail(f"{where}: unknown dtype {dtype!r}")
            if (not isinstance(shape, list) or len(shape) > 8
                    or not all(type(d) is int and 0 <= d < 2**40 for d in shape)):
                self._fail(f"{where}: bad shape {shape!r}")
            if (not isinstance(offs, list) or len(offs) != 2
                    or not all(type(o) is int for o in offs)):
                self._fail(f"{where}: bad data_offsets {offs!r}")
            begin, end = offs
            if not 0 <= begin <= end <= data_len:
                self._fail(f"{where}: data_offsets [{begin}, {end}] outside the data buffer of "
                           f"{data_len} bytes (file size {self.size})")
            count = 1
            for d in shape:
                count *= d
            if count * DTYPE_SIZES[dtype] != end - begin:
                self._fail(f"{where}: shape {shape} of {dtype} needs {count * DTYPE_SIZES[dtype]} "
                           f"bytes, data_offsets give {end - begin}")
            self.entries[name] = SafetensorsEntry(name, dtype, tuple(shape), data_start + begin,
                                                  end - begin)
        spans = sorted((e.offset, e.offset + e.nbytes, e.name) for e in self.entries.values()
                       if e.nbytes)
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                self._fail(f"tensors {an!r} and {bn!r} overlap")

    def tensor(self, name) -> np.ndarray:
        """A new float32 array (F32/F16/BF16 only) of the stored shape."""
        try:
            e = self.entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None
        if e.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {e.dtype}; prefopt loads "
                             f"only F32, F16 and BF16")
        n = e.nbytes // DTYPE_SIZES[e.dtype]
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=e.nbytes, offset=e.offset)
        return _core.dequantize(_GGML_OF[e.dtype], raw, n).reshape(e.shape)



class SafetensorsCheckpoint:
    """All tensors of a HF directory: ``model.safetensors`` or the shards listed in
    ``model.safetensors.index.json``. ``names`` lists them; ``tensor(name)`` loads one."""

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        index = os.path.join(self.directory, "model.safetensors.index.json")
        single = os.path.join(self.directory, "model.safetensors")
        self.files = {}
        self._where = {}
        if os.path.isfile(index):
            weight_map = self._read_index(index)
            for name, shard in weight_map.items():
                if shard not in self.files:
                    self.files[shard] = SafetensorsFile(os.path.join(self.directory, shard))
                if name not in self.files[shard].entries:
                    raise ValueError(f"{index}: tensor {name!r} is mapped to {shard}, which does "
                                     f"not contain it")
                self._where[name] = self.files[shard]
        elif os.path.isfile(single):
            f = SafetensorsFile(single)
            self.files["model.safetensors"] = f
            self._where = {name: f for name in f.entries}
        else:
            raise FileNotFoundError(f"{self.directory}: no model.safetensors or "
                                    f"model.safetensors.index.json")

    @staticmethod
    def _read_index(index):
        try:
            with open(index, "rb") as fh:
                data = json.loads(fh.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{index}: not valid JSON ({e})") from None
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise ValueError(f"{index}: missing or empty 'weight_map'")
        for name, shard in wm.items():
            if (not isinstance(shard, str) or not shard or os.path.basename(shard) != shard
                    or shard in (".", "..")):
                raise ValueError(f"{index}: tensor {name!r} maps to a bad shard file name {shard!r}")
        return wm

    @property
    def names(self):
        return list(self._where)

    def entry(self, name) -> SafetensorsEntry:
        return self._where[name].entries[name]

    def tensor(self, name) -> np.ndarray:
        try:
            f = self._where[name]
        except KeyError:
            raise KeyError(f"{self.directory}: checkpoint has no tensor {name!r}") from None
        return f.tensor(name)

    def close(self):
        for f in self.files.values():
            f.close()
