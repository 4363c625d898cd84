"""Real activations from files: a streaming data source of :class:`jsdl.Batch`.

Researchers save activations of their own models as *shards*: a directory of ``.npy`` files
(memory mapped) or ``.safetensors`` files, each a 2-D array ``[rows, d]`` of any float dtype
(float64/32/16, bfloat16, float8 via ``ml_dtypes``). :class:`ActivationFiles` streams them in
batches without ever loading the whole set into memory::

    src = ActivationFiles("acts/layer3", holdout=0.05, normalize=True)
    for batch in src.batches(4096, seed=0):        # an endless iterator of jsdl.Batch
        ...                                        # batch.x_p [4096, d] float32
    state, hist = jsdl.train.fit(key, spec, src.batches(4096, seed=0), config)

Pairs come from *matching shards* (same file names, same row counts), row ``i`` of one stream
paired with row ``i`` of the other:

* **transcoder**: ``ActivationFiles("mlp_in/", target="mlp_out/")`` (or two tensors of the same
  ``.safetensors`` files: ``ActivationFiles("acts/", key="mlp_in", target={"key": "mlp_out"})``)
  gives ``Batch(x_p [B, d_in], x_r [B, d_out])``;
* **crosscoder**: ``ActivationFiles(sources=["model_a/", "model_b/"])`` gives ``x_p [B, L, d]``
  (``x_r = None``: self-reconstruction).

Order, shuffling and split (all a function of global row indices, never of how rows are cut into
shards, so an in-memory array built with :meth:`ActivationFiles.from_arrays` streams exactly the
same batches as the same rows written as shards):

* the rows ``0..N-1`` (shards concatenated in natural file-name order) are cut into *chunks* of
  ``chunk_rows`` consecutive rows; a fraction ``holdout`` of the chunks, chosen with
  ``split_seed``, is held out (whole chunks, so neighbouring tokens of one document do not leak
  across the split);
* every epoch visits the training chunks in a random order and passes their rows through a shuffle
  buffer of ``shuffle_buffer`` rows (fill, permute, emit all but half, refill), as streaming
  loaders do; the randomness is ``numpy.random.default_rng([seed, epoch])``, so a stream is
  reproducible from its seed and can be resumed at any step (``start_step``) without reading the
  skipped data;
* each batch is gathered from the shards through a short-lived memory map that is closed right
  after, so resident memory stays at a few batches however large the set is.

Bad data never reaches training silently. Construction validates every shard header (corrupt,
truncated, mismatched widths, non-float dtypes and empty sets raise ``ValueError`` naming the
file) and, by default, scans all rows once (chunk by chunk) for NaN/inf: with ``nonfinite="error"``
(default) any such row raises, naming the file, the count and the first row; with ``"skip"`` the
rows are reported (a warning with per-file counts, and :meth:`ActivationFiles.info`) and left
out of every batch. Batches are re-checked as they are read.

Normalisation (``normalize=True``): each stream is multiplied by ``s = 1 / sqrt(E ||x||^2)``,
estimated on ``norm_sample`` training rows, so the mean squared norm is 1 (Gemma Scope,
dictionary_learning). The scales are recorded in :meth:`ActivationFiles.info` and
:func:`jsdl.export.fold_normalization` folds them back into the weights, so an exported
dictionary acts on raw activations.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jsdl.data.shards import (ArrayShard, Shard, is_float_dtype, np_dtype, open_shard, scan_shards, write_safetensors, write_shards)

__all__ = [
    "Shard",
    "ArrayShard",
    "Stream",
    "ActivationFiles",
    "open_shard",
    "scan_shards",
    "write_shards",
    "write_safetensors",
    "from_config",
    "CONFIG_KEYS",
]

# ------------------------------------------------------------------------------------------------
# Streams: a sequence of shards seen as one virtual [N, d] array
# ------------------------------------------------------------------------------------------------


class Stream:
    """Shards concatenated into one virtual array ``[n_rows, d]`` (global row indices)."""

    def __init__(self, shards: Sequence[Shard | ArrayShard], label: str = "x_p"):
        self.shards = list(shards)
        self.label = label
        sizes = np.array([s.n_rows for s in self.shards], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.n_rows = int(self.starts[-1])
        self.d = self.shards[0].d

    def shard_of(self, row: int) -> int:
        return int(np.searchsorted(self.starts, row, side="right") - 1)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Global rows ``start:stop`` (may span shards)."""
        parts = []
        i = self.shard_of(start)
        while start < stop:
            s0, s1 = self.starts[i], self.starts[i + 1]
            hi = min(stop, s1)
            if hi > start:
                parts.append(self.shards[i].read(start - s0, hi - s0))
            start = hi
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Global rows at indices ``rows`` (any order), in that order."""
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        which = np.searchsorted(self.starts, srt, side="right") - 1
        out = None
        for i in np.unique(which):
            sel = which == i
            part = self.shards[i].take(srt[sel] - self.starts[i])
            if out is None:
                out = np.empty((rows.size, self.d), part.dtype)
            out[order[sel]] = part
        if out is None:
            out = np.empty((0, self.d), self.shards[0].dtype)
        return out

    def locate(self, row: int) -> tuple[str, int]:
        i = self.shard_of(row)
        return self.shards[i].name, int(row - self.starts[i])


def _stream_from(spec, default_key, file_dtype, label) -> Stream:
    """A stream from a path / list of files / ``{"path": ..., "key": ...}`` / array."""
    if isinstance(spec, np.ndarray) or hasattr(spec, "__array__") and not isinstance(spec, (str, os.PathLike, list, tuple, Mapping)):
        arr = np.asarray(spec)
        if arr.ndim != 2:
            raise ValueError(f"{label}: an in-memory array must be 2-D [rows, d], got shape {arr.shape}")
        if not is_float_dtype(arr.dtype):
            raise TypeError(f"{label}: dtype {arr.dtype} is not a float type")
        if arr.shape[0] == 0:
            raise ValueError(f"{label}: the array holds no rows")
        return Stream([ArrayShard(arr, path=f"<{label} array>")], label)
    key = default_key
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"path", "key", "file_dtype"}
        if unknown:
            raise ValueError(f"{label}: unknown keys {sorted(unknown)}; allowed: path, key, file_dtype")
        key = spec.get("key", default_key)
        file_dtype = spec.get("file_dtype", file_dtype)
        spec = spec.get("path")
        if spec is None:
            raise ValueError(f"{label}: a stream needs a 'path'")
    return Stream(scan_shards(spec, key=key, file_dtype=file_dtype), label)


# ------------------------------------------------------------------------------------------------
# The data source
# ------------------------------------------------------------------------------------------------

#: Keys accepted by :func:`from_config` (``data: {files: {...}}`` in a YAML config).
CONFIG_KEYS = (
    "path", "key", "target", "sources", "file_dtype", "holdout", "split_seed", "chunk_rows",
    "shuffle_buffer", "normalize", "norm_sample", "nonfinite", "check_finite", "dtype", "seed",
)


class ActivationFiles:
    """A reproducible, memory-bounded stream of :class:`jsdl.Batch` from activation shards.

    Args:
      path: the input stream ``x_p``: a directory of shards, a glob, a file, a list of files, or
        ``{"path": ..., "key": ..., "file_dtype": ...}``. Omit it for a crosscoder (``sources``).
      key: tensor name inside ``.safetensors`` shards (default: the only float tensor).
      target: the target stream ``x_r`` of a transcoder (same forms as ``path``; a dict without
        ``path`` reads another tensor of the same files). Rows pair with the input by index and
        shards must match one to one (same file names and row counts).
      sources: crosscoder: a list of L streams with matching shards; batches are ``[B, L, d]``.
      file_dtype: how to read raw ``.npy`` dtypes (``'|V2'`` is taken as bfloat16 by default).
      holdout: fraction (``0 <= holdout < 1``) of chunks held out, or an int number of chunks.
      split_seed: seed of the held-out choice (kept apart from the training seed, so runs with
        different seeds share one held-out set).
      chunk_rows: rows per chunk (the unit of the split and of the epoch-level shuffle).
      shuffle_buffer: rows in the shuffle buffer (indices only: 8 bytes a row).
      normalize: scale each stream to unit mean squared norm (scale recorded in :meth:`info`).
      norm_sample: training rows used to estimate the scales.
      nonfinite: ``"error"`` (default) or ``"skip"`` rows holding NaN/inf.
      check_finite: scan every row at construction (default). Without the scan, a non-finite row
        met while streaming raises (it can neither be skipped reproducibly nor trained on).
      dtype: dtype of the emitted batches (default float32).
      seed: default seed of :meth:`batches`.
    """

    def __init__(
        self,
        path=None,
        *,
        key: str | None = None,
        target=None,
        sources: Sequence | None = None,
        file_dtype: str | None = None,
        holdout: float | int = 0.0,
        split_seed: int = 0,
        chunk_rows: int = 1024,
        shuffle_buffer: int = 65536,
        normalize: bool = False,
        norm_sample: int = 65536,
        nonfinite: str = "error",
        check_finite: bool = True,
        dtype: str = "float32",
        seed: int = 0,
    ):
        if (path is None) == (sources is None):
            raise ValueError("activation files: give exactly one of path (SAE/transcoder input) or sources (crosscoder)")
        if sources is not None and target is not None:
            raise ValueError("activation files: a crosscoder (sources=) reconstructs its inputs; target= does not apply")
        if nonfinite not in ("error", "skip"):
            raise ValueError(f"nonfinite must be 'error' or 'skip', got {nonfinite!r}")
        for nm, v, lo in (("chunk_rows", chunk_rows, 1), ("shuffle_buffer", shuffle_buffer, 1), ("norm_sample", norm_sample, 1)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{nm} must be an int >= {lo}, got {v!r}")
        try:
            self.dtype = np.dtype(np_dtype(dtype) if isinstance(dtype, str) else dtype)
        except TypeError:
            raise ValueError(f"dtype {dtype!r} is not a numpy float dtype") from None
        if not is_float_dtype(self.dtype):
            raise ValueError(f"dtype must be a float dtype, got {dtype!r}")

        if sources is not None:
            if isinstance(sources, (str, os.PathLike)) or len(sources) < 2:
                raise ValueError(f"sources must list at least 2 streams (one per crosscoder source), got {sources!r}")
            self.inputs = [_stream_from(s, key, file_dtype, f"source {i}") for i, s in enumerate(sources)]
            ds = {s.d for s in self.inputs}
            if len(ds) > 1:
                raise ValueError(
                    "activation files: crosscoder sources must share one width, got "
                    + ", ".join(f"{s.shards[0].name}: {s.d}" for s in self.inputs)
                )
            self.target = None
        else:
            self.inputs = [_stream_from(path, key, file_dtype, "x_p")]
            self.target = None
            if target is not None:
                if isinstance(target, Mapping) and "path" not in target:
                    if isinstance(path, Mapping):
                        target = {**{k: v for k, v in path.items() if k != "key"}, **target}
                    else:
                        target = {"path": path, **target}
                self.target = _stream_from(target, None if isinstance(target, Mapping) else key, file_dtype, "x_r")
        self._check_matching()

        self.n_rows = self.inputs[0].n_rows
        self.chunk_rows = int(chunk_rows)
        self.shuffle_buffer = int(shuffle_buffer)
        self.nonfinite = nonfinite
        self.seed = int(seed)
        self.split_seed = int(split_seed)
        n_chunks = -(-self.n_rows // self.chunk_rows)
        self.n_chunks = n_chunks
        n_hold = self._n_holdout(holdout, n_chunks)
        perm = np.random.default_rng([self.split_seed, 7919]).permutation(n_chunks)
        self.heldout_chunks = np.sort(perm[:n_hold])
        self.train_chunks = np.sort(perm[n_hold:])
        self.holdout = holdout

        # Non-finite rows: global indices (sorted) and per-file counts.
        self.bad_rows = np.empty((0,), np.int64)
        self.nonfinite_report: dict[str, int] = {}
        self.checked_finite = bool(check_finite)
        if check_finite:
            self._scan_nonfinite()

        self.scales: dict[str, Any] | None = None
        self.mean_sq_norms: dict[str, Any] | None = None
        self.normalize = bool(normalize)
        self.norm_sample = int(norm_sample)
        if normalize:
            self._estimate_scales()

    # -------------------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, x_p=None, x_r=None, *, sources: Sequence | None = None, **options) -> "ActivationFiles":
        """The same stream over in-memory arrays (``x_p [N, d]``, ``x_r [N, d_r]`` or crosscoder
        ``sources=[a [N, d], b [N, d], ...]``): same options, same batches as the same rows on disk."""
        if sources is not None:
            return cls(sources=[np.asarray(s) for s in sources], **options)
        return cls(np.asarray(x_p), target=None if x_r is None else np.asarray(x_r), **options)

    @staticmethod
    def _n_holdout(holdout, n_chunks: int) -> int:
        if isinstance(holdout, bool):
            raise ValueError(f"holdout must be a fraction in [0, 1) or an int number of chunks, got {holdout!r}")
        if isinstance(holdout, (int, np.integer)):
            n = int(holdout)
        else:
            h = float(holdout)
            if not 0.0 <= h < 1.0:
                raise ValueError(f"holdout must be a fraction in [0, 1) or an int number of chunks, got {holdout!r}")
            n = int(round(h * n_chunks))
            if h > 0 and n == 0:
                n = 1
        if n < 0 or (n >= n_chunks and n > 0):
            raise ValueError(
                f"holdout={holdout!r} leaves no training chunk ({n_chunks} chunks of chunk_rows rows); "
                "use a smaller holdout or a smaller chunk_rows"
            )
        return n

    def _streams(self) -> list[Stream]:
        return self.inputs + ([self.target] if self.target is not None else [])

    def _check_matching(self):
        streams = self._streams()
        ref = streams[0]
        for s in streams[1:]:
            if len(s.shards) != len(ref.shards):
                raise ValueError(
                    f"activation files: {s.label} has {len(s.shards)} shards (first {s.shards[0].name}) but "
                    f"{ref.label} has {len(ref.shards)} (first {ref.shards[0].name}); paired streams need matching shards"
                )
            for a, b in zip(ref.shards, s.shards):
                if a.n_rows != b.n_rows:
                    raise ValueError(
                        f"activation shard {b.name}: {b.n_rows} rows, but its pair {a.name} has {a.n_rows} rows"
                    )
                if (a.path != b.path and not a.path.startswith("<")
                        and os.path.splitext(os.path.basename(a.path))[0] != os.path.splitext(os.path.basename(b.path))[0]):
                    raise ValueError(
                        f"activation shard {b.name} is paired with {a.name}: paired streams need shards with matching file names"
                    )

    # -------------------------------------------------------------------------------------------
    @property
    def n_sources(self) -> int:
        return len(self.inputs) if len(self.inputs) > 1 else 1

    @property
    def d_input(self) -> int:
        """Width of one input source (``init_params``'s ``d_input``)."""
        return self.inputs[0].d

    @property
    def d_target(self) -> int:
        return self.target.d if self.target is not None else self.inputs[0].d

    @property
    def method_hint(self) -> str:
        return "crosscoder" if len(self.inputs) > 1 else ("transcoder" if self.target is not None else "sae")

    def _chunk_range(self, c: int) -> tuple[int, int]:
        return c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.n_rows)

    @property
    def n_train(self) -> int:
        return self._count(self.train_chunks)

    @property
    def n_heldout(self) -> int:
        return self._count(self.heldout_chunks)

    def _count(self, chunks) -> int:
        total = sum(b - a for a, b in (self._chunk_range(int(c)) for c in chunks))
        if self.bad_rows.size:
            total -= int(np.isin(self.bad_rows // self.chunk_rows, chunks).sum())
        return total

    # -------------------------------------------------------------------------------------------
    def _scan_nonfinite(self):
        bad: list[np.ndarray] = []
        for s in self._streams():
            for i, sh in enumerate(s.shards):
                step = max(1, (1 << 24) // max(1, sh.d * sh.dtype.itemsize))  # ~16 MB reads
                for a in range(0, sh.n_rows, step):
                    x = sh.read(a, min(a + step, sh.n_rows))
                    rows = np.nonzero(~np.isfinite(x.astype(self.dtype, copy=False)).all(axis=1))[0]  # as emitted
                    if rows.size:
                        self.nonfinite_report[sh.name] = self.nonfinite_report.get(sh.name, 0) + int(rows.size)
                        bad.append(rows + a + int(s.starts[i]))
                        if self.nonfinite == "error":
                            raise ValueError(
                                f"activation shard {sh.name}: row {int(rows[0]) + a} holds NaN or inf "
                                f"({rows.size} such rows in rows {a}..{min(a + step, sh.n_rows) - 1} of this file); "
                                "fix the data or set nonfinite='skip' to leave such rows out"
                            )
        if bad:
            self.bad_rows = np.unique(np.concatenate(bad))
            listing = ", ".join(f"{f}: {n}" for f, n in self.nonfinite_report.items())
            warnings.warn(
                f"activation files: skipping {self.bad_rows.size} rows holding NaN or inf ({listing})",
                RuntimeWarning,
                stacklevel=3,
            )

    def _estimate_scales(self):
        pool = self._rows_of(self.train_chunks)
        rng = np.random.default_rng([self.split_seed, 104729])
        n = min(self.norm_sample, pool.size)
        idx = np.sort(rng.choice(pool, size=n, replace=False)) if n < pool.size else pool
        msn = {}
        for s in self._streams():
            x = s.take(idx).astype(np.float64)
            msn[s.label] = float(np.mean(np.sum(x * x, axis=1)))
            if not msn[s.label] > 0 or not math.isfinite(msn[s.label]):
                raise ValueError(f"activation files: cannot normalise {s.label}: mean squared norm {msn[s.label]!r}")
        self.mean_sq_norms = msn
        self.scales = {k: 1.0 / math.sqrt(v) for k, v in msn.items()}

    def _rows_of(self, chunks) -> np.ndarray:
        if len(chunks) == 0:
            return np.empty((0,), np.int64)
        rows = np.concatenate([np.arange(*self._chunk_range(int(c)), dtype=np.int64) for c in chunks])
        if self.bad_rows.size:
            rows = rows[~np.isin(rows, self.bad_rows)]
        return rows

    # -------------------------------------------------------------------------------------------
    def info(self) -> dict:
        """A JSON-able record of the source (store it with the run; export reads ``normalization``)."""
        out = {
            "kind": "files",
            "method_hint": self.method_hint,
            "streams": [
                {"label": s.label, "d": s.d, "n_rows": s.n_rows, "files": [sh.name for sh in s.shards],
                 "file_dtypes": sorted({str(sh.dtype) for sh in s.shards})}
                for s in self._streams()
            ],
            "n_rows": self.n_rows,
            "n_train": self.n_train,
            "n_heldout": self.n_heldout,
            "holdout": self.holdout,
            "split_seed": self.split_seed,
            "chunk_rows": self.chunk_rows,
            "shuffle_buffer": self.shuffle_buffer,
            "nonfinite": self.nonfinite,
            "nonfinite_rows": {"total": int(self.bad_rows.size), "by_file": dict(self.nonfinite_report)},
            "normalization": None,
        }
        if self.scales is not None:
            out["normalization"] = {
                "kind": "unit_mean_squared_norm",
                "scales": dict(self.scales),
                "mean_squared_norms": dict(self.mean_sq_norms),
                "norm_sample": self.norm_sample,
            }
            # Convenience keys for export (fold_normalization): input/target scale factors.
            if len(self.inputs) == 1:
                out["normalization"]["input_scale"] = self.scales["x_p"]
                out["normalization"]["target_scale"] = self.scales.get("x_r", self.scales["x_p"])
        return out

    # -------------------------------------------------------------------------------------------
    def _epoch_indices(self, seed: int, epoch: int, split: str, shuffle: bool) -> Iterator[np.ndarray]:
        """Global row indices of one epoch, in the order they are emitted (pieces of any size)."""
        chunks = self.train_chunks if split == "train" else self.heldout_chunks
        if not shuffle:
            for c in chunks:
                rows = self._rows_of([c])
                if rows.size:
                    yield rows
            return
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(chunks)
        buf = np.empty((0,), np.int64)
        for c in order:
            buf = np.concatenate([buf, self._rows_of([c])])
            if buf.size >= self.shuffle_buffer:
                buf = buf[rng.permutation(buf.size)]
                n_out = buf.size - self.shuffle_buffer // 2
                yield buf[:n_out]
                buf = buf[n_out:]
        if buf.size:
            yield buf[rng.permutation(buf.size)]

    def index_batches(self, batch_size: int, *, seed: int | None = None, split: str = "train",
                      shuffle: bool | None = None, repeat: bool | None = None,
                      drop_remainder: bool | None = None) -> Iterator[np.ndarray]:
        """The global row indices ``[B]`` of each batch :meth:`batches` would yield (no data read)."""
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        train = split == "train"
        shuffle = train if shuffle is None else bool(shuffle)
        repeat = train if repeat is None else bool(repeat)
        drop_remainder = train if drop_remainder is None else bool(drop_remainder)
        seed = self.seed if seed is None else int(seed)
        n_avail = self.n_train if train else self.n_heldout
        if n_avail == 0:
            raise ValueError(f"activation files: the {split} split holds no rows (holdout={self.holdout!r})")
        if repeat and drop_remainder is False:
            raise ValueError("repeat=True streams forever; drop_remainder=False only applies to a single pass")
        pending: list[np.ndarray] = []
        n_pending = 0
        epoch = 0
        while True:
            for piece in self._epoch_indices(seed, epoch, split, shuffle):
                pending.append(piece)
                n_pending += piece.size
                if n_pending >= batch_size:
                    allrows = np.concatenate(pending)
                    n_full = allrows.size // batch_size
                    for b in range(n_full):
                        yield allrows[b * batch_size:(b + 1) * batch_size]
                    rest = allrows[n_full * batch_size:]
                    pending, n_pending = ([rest] if rest.size else []), rest.size
            epoch += 1
            if not repeat:
                break
        if n_pending and not drop_remainder:
            yield np.concatenate(pending)

    def batches(self, batch_size: int, *, seed: int | None = None, split: str = "train",
                shuffle: bool | None = None, repeat: bool | None = None, drop_remainder: bool | None = None,
                start_step: int = 0, with_indices: bool = False, rows: tuple[int, int] | None = None) -> Iterator:
        """An iterator of :class:`jsdl.Batch` (numpy arrays of ``dtype``).

        Training split (default): shuffled, endless (epochs follow each other), full batches only.
        ``split="heldout"``: one pass in file order, the last batch may be short.
        ``start_step`` skips that many batches without reading them (resuming a run).
        ``with_indices`` yields ``(global_row_indices [B], batch)`` instead.
        ``rows=(start, stop)``: read only those rows of every global batch (a process's share in a
        multi-process run, :func:`jsdl.train.mesh.process_batch_rows`; the shares are assembled into
        the global batch on the device mesh by ``jax.make_array_from_process_local_data``);
        ``batch_size`` stays the global size."""
        if rows is not None:
            r0, r1 = (int(v) for v in rows)
            if not 0 <= r0 < r1 <= batch_size:
                raise ValueError(f"rows must be (start, stop) with 0 <= start < stop <= batch_size={batch_size}, "
                                 f"got {rows!r}")
        it = self.index_batches(batch_size, seed=seed, split=split, shuffle=shuffle, repeat=repeat,
                                drop_remainder=drop_remainder)
        for step, idx in enumerate(it):
            if step < start_step:
                continue
            if rows is not None:
                idx = idx[r0:r1]
            b = self.read_rows(idx)
            yield (idx, b) if with_indices else b

    def read_rows(self, idx: np.ndarray):
        """The :class:`jsdl.Batch` of global rows ``idx`` (normalised if configured)."""
        from jsdl.objective import Batch

        xs = [self._read(s, idx) for s in self.inputs]
        x_p = xs[0] if len(xs) == 1 else np.stack(xs, axis=1)
        x_r = self._read(self.target, idx) if self.target is not None else None
        return Batch(x_p=x_p, x_r=x_r)

    def _read(self, s: Stream, idx: np.ndarray) -> np.ndarray:
        raw = s.take(np.asarray(idx, np.int64))
        x = raw.astype(self.dtype, copy=False) if raw.dtype != self.dtype else raw
        fin = np.isfinite(x).all(axis=1)
        if not fin.all():
            r = int(idx[np.argmin(fin)])
            f, local = s.locate(r)
            raise ValueError(
                f"activation shard {f}: row {local} holds NaN or inf"
                + (" after conversion to " + str(self.dtype) if np.isfinite(raw.astype(np.float64)).all() else "")
                + "; it was not found by a scan (construct with check_finite=True to report and skip such rows)"
            )
        if self.scales is not None:
            x = x * np.asarray(self.scales[s.label], self.dtype)
        return x

    def iter_chunks(self, split: str = "all", rows_per_read: int = 65536) -> Iterator:
        """``(global_row_indices, Batch)`` over the rows in file order, a block at a time (for
        statistics such as class means or top-activating inputs). ``split``: all/train/heldout.
        Non-finite rows are left out."""
        if split == "all":
            chunks = np.arange(self.n_chunks)
        elif split in ("train", "heldout"):
            chunks = self.train_chunks if split == "train" else self.heldout_chunks
        else:
            raise ValueError(f"split must be 'all', 'train' or 'heldout', got {split!r}")
        per = max(1, rows_per_read // self.chunk_rows)
        for i in range(0, len(chunks), per):
            rows = self._rows_of(chunks[i:i + per])
            if rows.size:
                yield rows, self.read_rows(rows)

    def __repr__(self) -> str:
        return (f"ActivationFiles({self.method_hint}, n_rows={self.n_rows}, d_input={self.d_input}, "
                f"d_target={self.d_target}, n_sources={self.n_sources}, train={self.n_train}, heldout={self.n_heldout})")


def from_config(cfg: Mapping[str, Any]) -> ActivationFiles:
    """Build an :class:`ActivationFiles` from the ``data: {files: ...}`` mapping of a YAML config.

    ``cfg`` may be a path string (``files: acts/``) or a mapping with the keys in
    :data:`CONFIG_KEYS` (the constructor's arguments). Unknown keys raise, listing the known ones."""
    if isinstance(cfg, (str, os.PathLike)):
        cfg = {"path": os.fspath(cfg)}
    if not isinstance(cfg, Mapping):
        raise TypeError(f"data.files must be a path or a mapping, got {type(cfg).__name__}")
    unknown = set(cfg) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"data.files: unknown keys {sorted(unknown)}; allowed: {', '.join(CONFIG_KEYS)}")
    cfg = dict(cfg)
    path = cfg.pop("path", None)
    return ActivationFiles(path, **cfg)
