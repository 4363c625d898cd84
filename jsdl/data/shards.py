"""Activation shard formats: reading and writing ``.npy`` and ``.safetensors`` shards.

A *shard* is one file holding a 2-D array ``[rows, d]`` of a float dtype (float64/32/16, bfloat16,
float8 via ``ml_dtypes``). :func:`open_shard` validates a file's header and returns a
:class:`Shard` that reads rows through a short-lived memory map; :func:`scan_shards` opens every
shard of a directory (or glob) in natural file-name order. :func:`write_safetensors` and
:func:`write_shards` write them (the codec is checked against the ``safetensors`` package in
the tests). :mod:`jsdl.data.files` streams batches from these shards.
"""
from __future__ import annotations

import dataclasses
import glob as _glob
import json
import os
import re
import struct
from typing import Any, Mapping

import numpy as np

__all__ = ["SHARD_SUFFIXES", "Shard", "ArrayShard", "open_shard", "scan_shards", "is_float_dtype",
           "safetensors_header", "ST_FLOAT_DTYPES",
           "np_dtype", "shard_error", "write_safetensors", "write_shards"]

SHARD_SUFFIXES = (".npy", ".safetensors")

# safetensors dtype codes -> numpy dtypes (bfloat16/float8 through ml_dtypes, a jax dependency).
ST_FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                   "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_ST_NONFLOAT = {"I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"}


def np_dtype(name: str) -> np.dtype:
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def is_float_dtype(dt: np.dtype) -> bool:
    if np.issubdtype(dt, np.floating):
        return True
    try:
        import ml_dtypes

        return dt in (np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
    except Exception:  # pragma: no cover - ml_dtypes ships with jax
        return False


def _natural_key(path: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shard:
    """One 2-D array ``[n_rows, d]`` stored in a file, read through short-lived memory maps.

    ``offset`` is the byte offset of the (C-ordered) data in the file. Reading never keeps a map
    open, so the pages it touched leave the process's resident set when the read returns."""

    path: str
    n_rows: int
    d: int
    dtype: np.dtype
    offset: int
    key: str | None = None  # tensor name inside a .safetensors file

    @property
    def name(self) -> str:
        return self.path if self.key is None else f"{self.path}[{self.key}]"

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.d * self.dtype.itemsize

    def _map(self, start: int, stop: int) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset + start * self.d * self.dtype.itemsize,
                         shape=(stop - start, self.d), order="C")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a fresh (in-memory) array of the file's dtype."""
        if stop <= start:
            return np.empty((0, self.d), self.dtype)
        m = self._map(start, stop)
        out = np.array(m, copy=True)
        del m  # the last reference: the map is closed now and its pages leave the resident set
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at the sorted local indices ``rows`` (one map over their span)."""
        if rows.size == 0:
            return np.empty((0, self.d), self.dtype)
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        m = self._map(lo, hi)
        out = np.array(m[rows - lo])  # fancy indexing copies
        del m
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayShard:
    """An in-memory array with the :class:`Shard` interface (for :meth:`ActivationFiles.from_arrays`)."""

    array: np.ndarray
    path: str = "<array>"
    key: str | None = None

    @property
    def name(self) -> str:
        return self.path

    @property
    def n_rows(self) -> int:
        return self.array.shape[0]

    @property
    def d(self) -> int:
        return self.array.shape[1]

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.array(self.array[start:stop], copy=True)

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.array[rows]


def shard_error(path: str, msg: str) -> ValueError:
    return ValueError(f"activation shard {path}: {msg}")


def _open_npy(path: str, file_dtype: str | None) -> Shard:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
        except Exception as e:
            raise shard_error(path, f"not a valid .npy file (bad magic: {e})") from None
        try:
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except Exception as e:
            raise shard_error(path, f"corrupt .npy header ({e})") from None
        offset = f.tell()
    if dtype.kind == "V" and not dtype.names:
        # numpy writes ml_dtypes arrays as raw void: '|V2' is bfloat16 (what np.save of an
        # ml_dtypes.bfloat16 array produces), '|V1' a float8 that must be named.
        if file_dtype is None and dtype.itemsize == 2:
            file_dtype = "bfloat16"
        if file_dtype is None:
            raise shard_error(path, f"raw dtype {dtype.str}: pass file_dtype= (e.g. 'float8_e4m3fn') to read it")
    if file_dtype is not None:
        fd = np_dtype(file_dtype)
        if fd.itemsize != dtype.itemsize:
            raise shard_error(path, f"file_dtype={file_dtype!r} has {fd.itemsize} bytes per value but the file stores {dtype.str}")
        dtype = fd
    return _make_shard(path, shape, fortran, dtype, offset, size, None)


def _make_shard(path, shape, fortran, dtype, offset, size, key) -> Shard:
    where = path if key is None else f"{path} (tensor {key!r})"
    if not is_float_dtype(dtype):
        raise TypeError(f"activation shard {where}: dtype {dtype} is not a float type (float16/32/64, bfloat16, float8)")
    if len(shape) != 2:
        raise shard_error(where, f"expected a 2-D array [rows, d], got shape {tuple(shape)}")
    if fortran and shape[0] > 1 and shape[1] > 1:
        raise shard_error(where, "Fortran-ordered arrays cannot be streamed by rows; save with np.ascontiguousarray")
    n, d = int(shape[0]), int(shape[1])
    if d < 1:
        raise shard_error(where, f"rows have width {d}")
    need = offset + n * d * dtype.itemsize
    if size < need:
        raise shard_error(where, f"truncated: the header promises {n} x {d} {dtype} values ({need} bytes) but the file has {size} bytes")
    return Shard(path=path, n_rows=n, d=d, dtype=np.dtype(dtype), offset=offset, key=key)


def safetensors_header(path: str) -> tuple[dict, int, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise shard_error(path, f"not a valid .safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise shard_error(path, f"corrupt .safetensors header (length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except Exception as e:
            raise shard_error(path, f"corrupt .safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise shard_error(path, "corrupt .safetensors header (not a JSON object)")
    return header, 8 + n, size


def _open_safetensors(path: str, key: str | None, file_dtype: str | None) -> Shard:
    header, base, size = safetensors_header(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if key is None:
        floats = [k for k, v in tensors.items() if isinstance(v, dict) and v.get("dtype") in ST_FLOAT_DTYPES]
        if len(floats) != 1:
            raise shard_error(path, f"holds float tensors {sorted(floats)}: name the one to read with key=")
        key = floats[0]
    if key not in tensors:
        raise shard_error(path, f"has no tensor {key!r} (tensors: {sorted(tensors)})")
    t = tensors[key]
    try:
        code, shape, (start, stop) = t["dtype"], [int(s) for s in t["shape"]], t["data_offsets"]
    except Exception:
        raise shard_error(path, f"corrupt header entry for tensor {key!r}: {t!r}") from None
    if code in _ST_NONFLOAT:
        raise TypeError(f"activation shard {path} (tensor {key!r}): dtype {code} is not a float type")
    if code not in ST_FLOAT_DTYPES:
        raise shard_error(path, f"tensor {key!r} has unknown dtype {code!r}")
    dtype = np_dtype(file_dtype or ST_FLOAT_DTYPES[code])
    if dtype.itemsize != np_dtype(ST_FLOAT_DTYPES[code]).itemsize:
        raise shard_error(path, f"file_dtype={file_dtype!r} does not match the stored {code}")
    if len(shape) == 2 and stop - start != shape[0] * shape[1] * dtype.itemsize:
        raise shard_error(path, f"corrupt header: tensor {key!r} of shape {shape} spans {stop - start} bytes")
    return _make_shard(path, shape, False, dtype, base + int(start), size, key)


def open_shard(path: str, *, key: str | None = None, file_dtype: str | None = None) -> Shard:
    """Validate one shard file's header and size and return its :class:`Shard` (no data is read)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"activation shard {path} does not exist")
    if path.endswith(".npy"):
        if key is not None:
            raise ValueError(f"activation shard {path}: key={key!r} only applies to .safetensors files")
        return _open_npy(path, file_dtype)
    if path.endswith(".safetensors"):
        return _open_safetensors(path, key, file_dtype)
    raise ValueError(f"activation shard {path}: unknown format (expected one of {SHARD_SUFFIXES})")


def _list_files(path) -> list[str]:
    if isinstance(path, (list, tuple)):
        files = [os.fspath(p) for p in path]
        if not files:
            raise ValueError("activation files: the list of shard files is empty")
        return files
    path = os.fspath(path)
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(SHARD_SUFFIXES)]
        if not files:
            raise ValueError(f"activation files: no {' or '.join(SHARD_SUFFIXES)} shards in directory {path}")
        kinds = {os.path.splitext(f)[1] for f in files}
        if len(kinds) > 1:
            raise ValueError(f"activation files: directory {path} mixes {sorted(kinds)} shards; keep one format per directory")
    elif any(c in path for c in "*?["):
        files = [f for f in _glob.glob(path) if f.endswith(SHARD_SUFFIXES)]
        if not files:
            raise ValueError(f"activation files: pattern {path} matches no {' or '.join(SHARD_SUFFIXES)} shards")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"activation files: {path} is neither a directory, a shard file nor a glob pattern")
    return sorted(files, key=_natural_key)


def scan_shards(path, *, key: str | None = None, file_dtype: str | None = None) -> list[Shard]:
    """Validate and list the shards of a directory, glob pattern, file or list of files (natural
    file-name order: ``shard_2`` before ``shard_10``). All shards must have the same width."""
    shards = [open_shard(f, key=key, file_dtype=file_dtype) for f in _list_files(path)]
    first = shards[0]
    for s in shards[1:]:
        if s.d != first.d:
            raise ValueError(
                f"activation shard {s.name}: rows have width {s.d} but {first.name} has width {first.d}; "
                "all shards of one stream must have the same dimension"
            )
    if sum(s.n_rows for s in shards) == 0:
        raise ValueError(f"activation files: the shards of {path} hold no rows")
    return shards




# ------------------------------------------------------------------------------------------------
# Writing shards
# ------------------------------------------------------------------------------------------------


def _st_code(dtype: np.dtype) -> str:
    for code, name in ST_FLOAT_DTYPES.items():
        if np_dtype(name) == dtype:
            return code
    raise TypeError(f"dtype {dtype} cannot be written to .safetensors as a float tensor")


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write float arrays (any dtype incl. bfloat16) to a ``.safetensors`` file (8-byte header
    length, JSON header, raw little-endian C-ordered data, offsets relative to the data start)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    arrs = []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        header[name] = {"dtype": _st_code(a.dtype), "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
        arrs.append(a)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the format aligns the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for a in arrs:
            f.write(a.tobytes())


def write_shards(directory: str, arrays: np.ndarray | Mapping[str, np.ndarray], *, rows_per_shard: int,
                 format: str = "npy", dtype: Any = None, prefix: str = "shard") -> list[str]:
    """Write ``arrays`` (one ``[N, d]`` array, or a mapping name -> ``[N, d_name]`` for paired
    tensors in ``.safetensors`` files) as shards of ``rows_per_shard`` rows: ``prefix_00000.npy``,
    ... Returns the file paths. ``dtype`` converts on the way (e.g. ``"bfloat16"``)."""
    if format not in ("npy", "safetensors"):
        raise ValueError(f"format must be 'npy' or 'safetensors', got {format!r}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard!r}")
    named = dict(arrays) if isinstance(arrays, Mapping) else {"activations": arrays}
    if format == "npy" and len(named) != 1:
        raise ValueError("format='npy' stores one array per file; use 'safetensors' for several tensors")
    ns = {a.shape[0] for a in named.values()}
    if len(ns) != 1:
        raise ValueError(f"arrays must have the same number of rows, got {sorted(ns)}")
    n = ns.pop()
    dt = np_dtype(dtype) if isinstance(dtype, str) else (np.dtype(dtype) if dtype is not None else None)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i, a in enumerate(range(0, max(n, 1), rows_per_shard)):
        part = {k: np.asarray(v[a:a + rows_per_shard]) for k, v in named.items()}
        if dt is not None:
            part = {k: v.astype(dt) for k, v in part.items()}
        p = os.path.join(directory, f"{prefix}_{i:05d}.{format}")
        if format == "npy":
            np.save(p, next(iter(part.values())))
        else:
            write_safetensors(p, part)
        paths.append(p)
    return paths
