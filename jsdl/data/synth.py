"""A SynthSAEBench-compatible generator, sampled on device inside the jitted step.

The recipe (the public SynthSAEBench description of SAELens's ``sae_lens.synthetic``; its 16k model
is :data:`SYNTH_16K`) draws coefficients ``f [B, n]`` and observations ``x = f E + b`` with

1. **firing probabilities** Zipfian over the feature index i = 0..n-1:
   ``q_i = (i+1)^-a`` affinely mapped onto ``[min_prob, max_prob]`` (descending);
2. a **hierarchy**: a forest of ``n_roots`` trees, ``branching`` children per node, ``depth``
   levels below the roots, numbered breadth first (roots first, a parent's children contiguous, so
   the most frequent features are the roots); features past the forest are free. A child fires only
   when its parent does. A portion ``mutually_exclusive_portion`` of the eligible parents (depth in
   ``[mutually_exclusive_min_depth, mutually_exclusive_max_depth]``, at least two children) has
   mutually exclusive children: of the children that fire together, one chosen uniformly at random
   survives. With ``compensate_probabilities`` the base probability of a child c of parent P
   (with siblings S) is multiplied by ``1/q_P`` and, under exclusion, by
   ``1 + sum_{s in S, s != c} q_s / q_P``, then clipped to 1, so that the realised rates stay close
   to the Zipf law. With ``scale_children_by_parent`` a surviving child's magnitude is multiplied
   by ``f_P / mu_P`` (parent magnitude over the parent's mean magnitude) instead of being gated;
3. **low-rank correlated firing** (Gaussian copula): ``z = eps F^T + eta * sqrt(1 - |F_i|^2)``,
   ``eps ~ N(0, I_rank)``, ``eta ~ N(0, I_n)``, ``F [n, rank] ~ N(0, scale^2)`` (rows with
   ``|F_i|^2 > 0.99`` rescaled to 0.99), and feature i fires iff ``z_i > Phi^-1(1 - p_i)``; without
   correlation independent Bernoulli(p_i);
4. **magnitudes** ``relu(mu_i + sigma_i eps)`` with ``mu`` linear from ``magnitude_mean_start``
   (feature 0) to ``magnitude_mean_end`` and ``sigma_i = |N(magnitude_std_mean, magnitude_std_std^2)|``
   (folded normal, drawn once per feature);
5. the hierarchy is applied level by level (gating / rescaling of level L, then the exclusion
   among the children of level-L parents), then ``relu``;
6. **feature vectors** ``E [n, d]``: Gaussian rows normalised to unit norm, then ``orthogonalize_steps``
   Adam steps (learning rate ``orthogonalize_lr``) on ``sum_{i != j} (e_i . e_j)^2 + n sum_i
   (|e_i|^2 - 1)^2``, renormalised; a **bias** ``b [d]`` of norm ``bias`` (random direction).

Everything random comes from one JAX key; sampling ``sample(key, B)`` is jit-able and generates a
batch on device (nothing of size dataset x d is ever held). On a CPU the cost of such a sampler is
its random numbers (a threefry uniform costs ~5x an ``ndtr``), so it draws them only where the
result can depend on them, top down, and is exact in distribution (:meth:`SynthBench._sample`):
given the copula's factor draw the features fire independently; the roots and the frequent free
features take one uniform each, which decides both firing and magnitude; children are drawn only
under their parent's slot (one slot per root, then one per surviving child), so the children of
inactive parents, most of the recipe's features, cost nothing; the rare free features are drawn
sparsely from a Poisson process of candidates (:meth:`SynthBench._sparse_free`). The generator agrees with SAELens in
distribution, not bit for bit (different random number generators).

On the CPU backend (float32) the same algorithm runs by default as a native kernel,
:func:`jsdl.native.synth_draw`, one sample at a time with control flow instead of fixed shapes
(``SynthBench.sampler``: ``auto``, ``jax`` or ``native``; :meth:`SynthBench.uses_native`). Its
distribution is the JAX sampler's; its random stream is its own, so a key gives different samples
on the two paths (``sampler="jax"`` gives the same stream on every backend). In jsdl's conventions the
ground-truth dictionary is ``W_p = W_r = E^T [d, n]`` and ``Batch.features = f``, so every
:mod:`jsdl.metrics` function and the landscape module accept a :class:`SynthBench`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jsdl.data import rng as _rng
from jsdl.data.bench import (SamplingMixin, check_sampler, decode_active, jit_when_eager, key_words,
                             native_batch, use_sparse_decode)
from jsdl.data.structured import build_hierarchy, hierarchy_depth
from jsdl.kernels import SparseCodes
from jsdl.objective import Batch

__all__ = [
    "SynthConfig",
    "SynthBench",
    "SYNTH_16K",
    "SYNTH_PRESETS",
    "make_synth",
    "synth_config",
    "zipf_probabilities",
    "synth_hierarchy",
    "compensated_probabilities",
    "orthogonalize",
]

# Rows of the correlation factor are capped so the copula's idiosyncratic variance stays >= this.
_MIN_DIAG = 0.01


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Settings of the SynthSAEBench recipe (module docstring). Defaults are the SynthSAEBench-16k
    model (:data:`SYNTH_16K`). ``n_roots = 0`` disables the hierarchy, ``correlation_rank = 0`` the
    correlation, ``bias = 0`` the bias, ``orthogonalize_steps = 0`` the orthogonalisation.
    ``branching`` is an int or a ``(min, max)`` pair (children per node drawn uniformly).
    ``orthogonalize_chunk`` is accepted for old configs and has no effect (:func:`orthogonalize`
    needs no pairwise blocks)."""

    n_features: int = 16384
    d_input: int = 768
    # firing probabilities (Zipf)
    max_prob: float = 0.4
    min_prob: float = 5e-4
    zipf_exponent: float = 0.5
    # hierarchy
    n_roots: int = 128
    branching: Union[int, tuple] = 4
    depth: int = 3
    mutually_exclusive_portion: float = 1.0
    mutually_exclusive_min_depth: int = 0
    mutually_exclusive_max_depth: Optional[int] = None
    compensate_probabilities: bool = True
    scale_children_by_parent: bool = True
    # low-rank correlation
    correlation_rank: int = 25
    correlation_scale: float = 0.1
    # magnitudes
    magnitude_mean_start: float = 5.0
    magnitude_mean_end: float = 4.0
    magnitude_std_mean: float = 0.5
    magnitude_std_std: float = 0.5
    # feature vectors
    orthogonalize_steps: int = 100
    orthogonalize_lr: float = 3e-4
    orthogonalize_chunk: int = 2048  # no effect (see the docstring)
    bias: float = 0.5

    def __post_init__(self):
        def pos_int(name, lo=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"synth.{name} must be an int >= {lo}, got {v!r}")

        def num(name, lo, hi, lo_open=False, hi_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
                raise ValueError(f"synth.{name} must be a finite number, got {v!r}")
            if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
                raise ValueError(
                    f"synth.{name}={v!r} is outside {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")

        pos_int("n_features")
        pos_int("d_input")
        num("max_prob", 0.0, 1.0, lo_open=True)
        num("min_prob", 0.0, 1.0, lo_open=True)
        if not self.min_prob < self.max_prob:
            raise ValueError(f"synth: need min_prob < max_prob, got min_prob={self.min_prob} max_prob={self.max_prob}")
        num("zipf_exponent", 0.0, math.inf, lo_open=True, hi_open=True)
        pos_int("n_roots", 0)
        b = self.branching
        if isinstance(b, list):
            object.__setattr__(self, "branching", tuple(b))
            b = self.branching
        if isinstance(b, tuple):
            if len(b) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in b) or not 2 <= b[0] <= b[1]:
                raise ValueError(f"synth.branching must be an int >= 2 or a (min, max) pair with 2 <= min <= max, got {b!r}")
        elif isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 2:
            raise ValueError(f"synth.branching must be an int >= 2 or a (min, max) pair, got {b!r}")
        pos_int("depth")
        num("mutually_exclusive_portion", 0.0, 1.0)
        pos_int("mutually_exclusive_min_depth", 0)
        if self.mutually_exclusive_max_depth is not None:
            pos_int("mutually_exclusive_max_depth", self.mutually_exclusive_min_depth)
        for name in ("compensate_probabilities", "scale_children_by_parent"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"synth.{name} must be true or false, got {getattr(self, name)!r}")
        pos_int("correlation_rank", 0)
        num("correlation_scale", 0.0, math.inf, hi_open=True)
        num("magnitude_mean_start", 0.0, math.inf, lo_open=True, hi_open=True)
        num("magnitude_mean_end", 0.0, math.inf, lo_open=True, hi_open=True)
        num("magnitude_std_mean", -math.inf, math.inf, lo_open=True, hi_open=True)
        num("magnitude_std_std", 0.0, math.inf, lo_open=True, hi_open=True)
        pos_int("orthogonalize_steps", 0)
        num("orthogonalize_lr", 0.0, math.inf, lo_open=True, hi_open=True)
        pos_int("orthogonalize_chunk")
        num("bias", 0.0, math.inf, hi_open=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SynthConfig":
        """From a mapping (e.g. YAML). ``preset: NAME`` (a key of :data:`SYNTH_PRESETS`) starts from
        that preset; the other keys override it. Unknown keys fail naming the valid ones."""
        if not isinstance(d, Mapping):
            raise TypeError(f"synth settings must be a mapping, got {type(d).__name__}")
        d = dict(d)
        preset = d.pop("preset", None)
        base = {} if preset is None else dataclasses.asdict(synth_config(preset))
        names = [f.name for f in dataclasses.fields(cls)]
        bad = sorted(set(d) - set(names))
        if bad:
            raise ValueError(f"unknown synth key(s) {bad}; valid keys: preset, {', '.join(names)}")
        base.update(d)
        return cls(**base)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["branching"], tuple):
            d["branching"] = list(d["branching"])
        return d


#: The SynthSAEBench-16k model: 16384 features, d = 768, Zipf(0.5) on [5e-4, 0.4], 128 roots x
#: branching 4 x depth 3 with all children mutually exclusive, compensated probabilities, children
#: scaled by their parent, rank-25 correlation of scale 0.1, magnitudes linear 5 -> 4 with folded
#: normal(0.5, 0.5) std, 100 orthogonalisation steps at lr 3e-4, bias norm 0.5.
SYNTH_16K = SynthConfig()

#: Named presets. ``"cpu"`` keeps the recipe's shape (Zipf range, a deep mutually exclusive
#: hierarchy over about two thirds of the features, correlation, magnitudes, bias) at 2048 features
#: and d = 128, which a 2-core CPU trains in minutes.
SYNTH_PRESETS = {
    "16k": SYNTH_16K,
    "cpu": dataclasses.replace(SYNTH_16K, n_features=2048, d_input=128, n_roots=16, correlation_rank=8,
                               orthogonalize_steps=100),
    "tiny": dataclasses.replace(SYNTH_16K, n_features=256, d_input=32, n_roots=4, depth=2, correlation_rank=4,
                                orthogonalize_steps=20),
}


def synth_config(preset: Union[str, SynthConfig, Mapping[str, Any]] = "16k", **overrides: Any) -> SynthConfig:
    """A :class:`SynthConfig` from a preset name (``"16k"``, ``"cpu"``, ``"tiny"``), a config or a
    mapping, with keyword overrides."""
    if isinstance(preset, SynthConfig):
        cfg = preset
    elif isinstance(preset, str):
        if preset not in SYNTH_PRESETS:
            raise ValueError(f"unknown synth preset {preset!r}; presets: {', '.join(SYNTH_PRESETS)}")
        cfg = SYNTH_PRESETS[preset]
    elif isinstance(preset, Mapping):
        cfg = SynthConfig.from_dict(preset)
    else:
        raise TypeError(f"preset must be a preset name, a SynthConfig or a mapping, got {type(preset).__name__}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# --------------------------------------------------------------------------------------------------
# Host-side construction
# --------------------------------------------------------------------------------------------------


def zipf_probabilities(n: int, exponent: float, max_prob: float, min_prob: float) -> np.ndarray:
    """``[n]`` descending: ``(i+1)^-exponent`` mapped affinely onto ``[min_prob, max_prob]``
    (float32, as the reference computes it)."""
    if n == 1:
        return np.asarray([max_prob], np.float32)
    q = 1.0 / np.arange(1, n + 1, dtype=np.float32) ** np.float32(exponent)
    return (np.float32(min_prob) + np.float32(max_prob - min_prob) * (q - q.min()) / (q.max() - q.min())).astype(np.float32)


def synth_hierarchy(cfg: SynthConfig, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(parent_of [n], level [n], exclusive [n])`` of the recipe's forest: parent index (-1 for
    roots and free features), depth below the root (-1 for free features), and whether a feature's
    children are mutually exclusive. Features are numbered breadth first; the forest is cut when
    the features run out. ``seed`` drives random branching and the choice of exclusive parents."""
    n = cfg.n_features
    parent_of = np.full(n, -1, np.int64)
    level = np.full(n, -1, np.int64)
    exclusive = np.zeros(n, bool)
    if cfg.n_roots == 0:
        return parent_of, level, exclusive
    rng = np.random.default_rng(seed)
    if isinstance(cfg.branching, tuple):
        # Random branching: grow breadth first, one parent at a time.
        nodes = min(cfg.n_roots, n)
        level[:nodes] = 0
        frontier = list(range(nodes))
        for lv in range(1, cfg.depth + 1):
            nxt = []
            for p in frontier:
                for _ in range(int(rng.integers(cfg.branching[0], cfg.branching[1] + 1))):
                    if nodes >= n:
                        break
                    parent_of[nodes], level[nodes] = p, lv
                    nxt.append(nodes)
                    nodes += 1
            frontier = nxt
    else:
        # Fixed branching: the complete forest of jsdl.data.structured, cut to n features.
        full = build_hierarchy(cfg.n_roots, int(cfg.branching), cfg.depth)[:n]
        m = full.shape[0]
        parent_of[:m] = full
        lv = np.zeros(m, np.int64)
        for i in range(m):  # BFS numbering: a parent precedes its children
            if full[i] >= 0:
                lv[i] = lv[full[i]] + 1
        level[:m] = lv
    n_children = np.bincount(parent_of[parent_of >= 0], minlength=n)
    # Internal nodes (depth < max depth) with >= 2 children and depth in the allowed range.
    hi = cfg.mutually_exclusive_max_depth
    eligible = np.flatnonzero((level >= 0) & (level < cfg.depth) & (n_children >= 2)
                              & (level >= cfg.mutually_exclusive_min_depth) & ((level <= hi) if hi is not None else True))
    k = int(len(eligible) * cfg.mutually_exclusive_portion)
    if k > 0:
        exclusive[rng.choice(eligible, size=k, replace=False)] = True
    return parent_of, level, exclusive


def compensated_probabilities(p: np.ndarray, parent_of: np.ndarray, exclusive: np.ndarray) -> np.ndarray:
    """Base probabilities after the hierarchy compensation (module docstring), clipped to 1."""
    p = np.asarray(p, np.float64)
    factor = np.ones_like(p)
    child = np.flatnonzero(parent_of >= 0)
    par = parent_of[child]
    ok = p[par] > 0
    factor[child[ok]] = 1.0 / p[par[ok]]
    # Exclusion: 1 + (sum of the siblings' base probabilities) / p_parent.
    sib_sum = np.bincount(par, weights=p[child], minlength=p.shape[0])
    n_children = np.bincount(par, minlength=p.shape[0])
    me = exclusive[par] & (n_children[par] >= 2) & ok
    c, pp = child[me], par[me]
    factor[c] *= 1.0 + np.maximum(sib_sum[pp] - p[c], 0.0) / p[pp]
    return np.minimum(p * factor, 1.0).astype(np.float32)


def _ortho_grad(E: jax.Array) -> jax.Array:
    """Gradient of ``sum_{i != j} (e_i . e_j)^2 + n sum_i (|e_i|^2 - 1)^2`` for ``E [n, d]``:
    ``4 (sum_{j != i} (e_i . e_j) e_j) + 4 n (|e_i|^2 - 1) e_i``, where the sum over j is
    ``(E (E^T E))_i - |e_i|^2 e_i``. Through the ``[d, d]`` matrix ``E^T E`` it costs O(n d^2) and
    O(n d) memory; the pairwise Gram ``E E^T`` (what the reference computes, in chunks) costs
    O(n^2 d): at 16384 x 768 that is 21x the flops."""
    n = E.shape[0]
    hi = jax.lax.Precision.HIGHEST  # the sum cancels |e_i|^2 e_i out of (E E^T E)_i
    sq = jnp.sum(E * E, axis=1)
    return 4.0 * (jnp.dot(E, jnp.dot(E.T, E, precision=hi), precision=hi) - sq[:, None] * E) \
        + 4.0 * n * (sq - 1.0)[:, None] * E


def _unit_rows(E: jax.Array) -> jax.Array:
    return E / jnp.maximum(jnp.linalg.norm(E, axis=1, keepdims=True), 1e-8)


@functools.partial(jax.jit, static_argnums=(1,))
def _orthogonalize_run(E: jax.Array, steps: int, lr: jax.Array) -> jax.Array:
    import optax

    E = _unit_rows(E)
    if steps == 0:
        return E
    opt = optax.adam(lr)

    def body(_, carry):
        P, s = carry
        upd, s = opt.update(_ortho_grad(P), s, P)
        return optax.apply_updates(P, upd), s

    return _unit_rows(jax.lax.fori_loop(0, steps, body, (E, opt.init(E)))[0])


def orthogonalize(E: jax.Array, steps: int, lr: float, chunk: Optional[int] = None) -> jax.Array:
    """Unit rows of ``E [n, d]`` pushed apart by ``steps`` Adam steps (module docstring, item 6),
    renormalised. Memory O(n d) (:func:`_ortho_grad`). One compiled program per shape and number
    of steps (the learning rate is an argument). ``chunk`` is accepted and unused: the gradient
    no longer forms pairwise blocks."""
    del chunk
    return _orthogonalize_run(E, int(steps), np.asarray(lr, E.dtype))


# --------------------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class SynthBench(SamplingMixin):
    """The SynthSAEBench generator as a jsdl bench (module docstring). Array fields: ``W_p = W_r``
    ``[d, n]`` (unit feature vectors as columns), ``bias [d]``, ``probs [n]`` (base firing
    probabilities after compensation), ``thresholds [n]`` (``Phi^-1(1 - probs)``), ``mean_mag``,
    ``std_mag [n]``, ``corr_factor [n, rank]`` / ``corr_sqrt_diag [n]`` (or None), ``parent_of [n]``
    (-1 for roots and free features), ``children [n, b_max]`` (each feature's children, -1 padded),
    ``exclusive [n]`` (its children are mutually exclusive), and the tables of the sparse free
    block (:meth:`_sparse_free`): ``cand_hazard``, ``cand_prob [n - sparse_start]`` and
    ``viol_margin`` (None without correlation). Static: ``settings`` (the
    :class:`SynthConfig`), ``depth``, ``n_roots`` (roots are features ``[0, n_roots)``),
    ``tree_end`` (features ``[tree_end, n)`` are free), ``reducible`` (per level 1..depth: every
    parent one level up has at most one surviving child), ``sparse_start``, ``n_arrivals`` and
    ``viol_expected`` (mean violations per sample) of the sparse free block; ``sampler``
    (:meth:`uses_native`)."""

    W_p: jax.Array
    W_r: jax.Array
    bias: jax.Array
    probs: jax.Array
    thresholds: jax.Array
    mean_mag: jax.Array
    std_mag: jax.Array
    parent_of: jax.Array
    children: jax.Array
    exclusive: jax.Array
    corr_factor: Optional[jax.Array] = None
    corr_sqrt_diag: Optional[jax.Array] = None
    cand_hazard: Optional[jax.Array] = None
    cand_prob: Optional[jax.Array] = None
    viol_margin: Optional[jax.Array] = None
    data_key: Optional[jax.Array] = None
    rows_cache: Optional[dict] = None
    settings: SynthConfig = struct.field(pytree_node=False, default=SYNTH_16K)
    depth: int = struct.field(pytree_node=False, default=0)
    n_roots: int = struct.field(pytree_node=False, default=0)
    tree_end: int = struct.field(pytree_node=False, default=0)
    sparse_start: int = struct.field(pytree_node=False, default=0)
    n_arrivals: int = struct.field(pytree_node=False, default=0)
    viol_expected: float = struct.field(pytree_node=False, default=0.0)
    reducible: tuple = struct.field(pytree_node=False, default=())
    rescale: bool = struct.field(pytree_node=False, default=True)
    sampler: str = struct.field(pytree_node=False, default="auto")
    method: str = struct.field(pytree_node=False, default="sae")
    n_sources: int = struct.field(pytree_node=False, default=1)
    dataset_size: int = struct.field(pytree_node=False, default=0)
    kind: str = struct.field(pytree_node=False, default="synth_sae_bench")

    # -- sampling ----------------------------------------------------------------------------------
    def _native_law(self) -> bool:
        # SamplingMixin.uses_native: the native sampler is :func:`jsdl.native.synth_draw`, the
        # algorithm of :meth:`_parts` one sample at a time
        return True

    def _native_draw(self, key: jax.Array, batch_size: int, features: bool) -> jax.Array:
        """``x_p [B, d]`` (or with ``features`` the dense features ``[B, n]``) of the native
        sampler; the two outputs of one key describe the same samples."""
        from jsdl import native

        dt = self.W_p.dtype
        n, Z = self.n_features, self.sparse_start
        m = n - Z
        r = 0 if self.corr_factor is None else int(self.corr_factor.shape[1])
        ones = jnp.ones((n,), dt)
        feat = jnp.stack([self.probs, self.thresholds if r else ones, self.corr_sqrt_diag if r else ones,
                          self.mean_mag, self.std_mag, self._positive_fraction()]).astype(dt)
        F = self.corr_factor if r else jnp.zeros((n, 1), dt)
        Ft = self.corr_factor[Z:].T if r and m else jnp.zeros((max(r, 1), 1), dt)
        if m:
            with_viol = r and self.viol_expected > 0 and self.viol_margin is not None
            margin = self.viol_margin if with_viol else jnp.full((m,), jnp.inf, dt)
            sparse = jnp.stack([self.cand_hazard, self.cand_prob, margin]).astype(dt)
        else:
            sparse = jnp.zeros((3, 1), dt)
        args = (key_words(key), self.feature_rows("W_p"), self.bias, feat, F, Ft, self.children, self.exclusive, sparse)
        kw = dict(n_roots=self.n_roots, tree_end=self.tree_end, sparse_start=Z, rank=r, rescale=self.rescale,
                  features=features)
        return native_batch(native.synth_draw, args, batch_size, **kw)

    def _fire_prob(self, eps: Optional[jax.Array], idx, proj: Optional[jax.Array] = None) -> jax.Array:
        """Firing probability of features ``idx`` given the copula factor draw ``eps [B, rank]``:
        ``P(z_i > Phi^-1(1 - p_i) | eps) = Phi(((eps F^T)_i - Phi^-1(1 - p_i)) / sqrt(1 - |F_i|^2))``;
        ``p_i`` without correlation. ``idx``: a slice (-> ``[B, m]``) or an index array ``[B, ...]``.
        ``proj``: ``eps F^T`` for the columns ``[0, proj.shape[1])`` when the caller has it (an
        index array then reads its entries instead of gathering ``[B, ..., rank]`` rows of ``F``)."""
        if self.corr_factor is None:
            return self.probs[idx]
        if isinstance(idx, slice):
            pr = eps @ self.corr_factor[idx].T if proj is None else proj[:, idx]
        elif proj is not None:
            B = idx.shape[0]
            pr = jnp.take_along_axis(proj, idx.reshape(B, -1), axis=1).reshape(idx.shape)
        else:
            F = self.corr_factor[idx]  # [B, ..., rank]
            pr = jnp.einsum("b...r,br->b...", F, eps)
        return self._prob_given(pr, idx)

    def _prob_given(self, pr: jax.Array, idx) -> jax.Array:
        """``Phi((pr - Phi^-1(1 - p_i)) / sqrt(1 - |F_i|^2))``: the firing probability of features
        ``idx`` given their copula projections ``pr = (eps F^T)_idx`` (same shape as ``idx``)."""
        return jax.scipy.special.ndtr((pr - self.thresholds[idx]) / self.corr_sqrt_diag[idx])

    def _values(self, u: jax.Array, p: jax.Array, idx) -> jax.Array:
        """``relu(mu_i + sigma_i z)`` where ``u < p`` (the feature fires), else 0, with the magnitude
        noise ``z = -Phi^-1(u / p)``: given ``u < p``, ``u / p`` is Uniform(0, 1) and independent of
        which features fire, so one uniform per (sample, feature) decides both (random numbers are
        the sampler's cost on a CPU). ``u / p`` is clipped to ``[1e-7, 1 - 1e-7]`` (``|z| <= 5.3``)."""
        dt = u.dtype
        v = jnp.clip(u / jnp.where(p > 0, p, 1.0), 1e-7, 1.0 - 1e-7)
        z = -jax.scipy.special.ndtri(v)
        return jnp.where(u < p, jax.nn.relu(self.mean_mag[idx] + self.std_mag[idx] * z), jnp.zeros((), dt))

    def _positive_fraction(self) -> jax.Array:
        """``Phi(mu_i / sigma_i) [n]``: a feature drawn with uniform ``u`` under firing probability
        ``p`` (:meth:`_values`) has a positive value iff ``u < p`` and ``mu + sigma z > 0`` with
        ``z = -Phi^-1(u / p)``, i.e. iff ``u < p Phi(mu / sigma)`` (``Phi^-1`` is increasing; the two
        tests agree up to float rounding). The samplers decide which slots are live with this test
        rather than with ``value > 0``: XLA CPU fuses the value's ndtri chain into every consumer
        (an ``optimization_barrier`` does not survive its pipeline), so each use of the values
        computed it once more (measured: most of the tree's cost)."""
        return jax.scipy.special.ndtr(self.mean_mag / jnp.where(self.std_mag > 0, self.std_mag, 1e-30))

    def _sparse_free(self, u_gap: jax.Array, u_acc: jax.Array, key: jax.Array, eps: Optional[jax.Array]) -> dict:
        """The rare free features ``[Z, n)`` (``Z = sparse_start``), drawn with random numbers only
        where a feature can fire; in distribution exactly the dense draw (one uniform per feature),
        up to a truncation of probability < 1e-15 per sample. Returns their active sets (a dict
        read by :meth:`_free_block`, which densifies them into ``[B, n - Z]``, and by
        :meth:`draw`): ``slots = (cols, vals) [B, n_arrivals]`` (global columns, -1 / 0 where
        empty), ``viol = (rows, cols, vals) [V]`` or None, ``overflow`` (None or a traced bool)
        and ``dense`` (the block drawn densely, used when ``overflow``).

        *Candidates*: feature i is a candidate with probability ``q_i`` (``cand_prob``), independently,
        as the features whose interval ``[H_{i-1}, H_i)`` (``H = cand_hazard``, the cumulative sum of
        ``-log(1 - q_i)``) holds at least one point of a unit-rate Poisson process on ``[0, H_n)``:
        ``n_arrivals`` exponential gaps per sample, where ``n_arrivals`` is the smallest K with
        ``P(Poisson(H_n) > K) < 1e-15`` (more points would be dropped). A candidate fires with
        probability ``min(1, P_i / q_i)`` (``P_i`` the firing probability given the copula's
        ``eps``), so it fires with probability ``min(P_i, q_i)``.

        *Residual*: where ``P_i > q_i`` (a *violation*: ``(eps F^T)_i > viol_margin_i``, found by
        one dense ``[B, n - Z]`` matrix product, no random numbers) the feature also fires with
        probability ``(P_i - q_i) / (1 - q_i)``, independently; the union fires with probability
        ``P_i``. ``q_i = Phi((c |F_i| - Phi^-1(1 - p_i)) / sqrt(1 - |F_i|^2))`` with c = 3, so a
        violation needs the factor's projection 3 standard deviations out (about one per sample at
        2048 features). The batch's violations are gathered into ``2 B viol_expected + 32`` slots
        (:func:`_compact`); if the batch has more (a function of ``eps`` only, so the choice does not
        bias the draw), the whole block is drawn densely instead (``lax.cond``), which keeps the draw
        exact; measured: never in 300 batches of 1024 at the ``cpu`` and ``16k`` presets. Without correlation ``q_i >= p_i`` and there are no violations.
        A firing feature's magnitude noise recycles its uniform (``_values``)."""
        dt = self.W_p.dtype
        n, Z = self.n_features, self.sparse_start
        m = n - Z
        B = u_gap.shape[0]
        k_res, k_dense = jax.random.split(key)
        t_arr = jnp.cumsum(-jnp.log1p(-u_gap), axis=1)  # exponential gaps
        idx = jnp.searchsorted(self.cand_hazard, t_arr, side="right").astype(jnp.int32)  # [B, K], m = none
        first = (idx < m) & jnp.concatenate([jnp.ones((B, 1), bool), idx[:, 1:] != idx[:, :-1]], axis=1)
        si = jnp.minimum(idx, m - 1)
        col = Z + si
        u = u_acc
        q = self.cand_prob[si]
        with_viol = self.corr_factor is not None and self.viol_expected > 0
        proj = eps @ self.corr_factor[Z:].T if with_viol else None  # [B, m]
        if proj is None:
            P = self._fire_prob(eps, col)
        else:  # read the block's projections rather than gather [B, K, rank] rows of F
            P = self._prob_given(jnp.take_along_axis(proj, si, axis=1), col)
        acc = jnp.minimum(P / q, 1.0)
        # Live slots are marked by their column (-1 elsewhere), decided without the value (see
        # _positive_fraction), so that the magnitude's ndtri chain has one consumer.
        pos_frac = self._positive_fraction()
        fires = first & (u < acc * pos_frac[col])
        val_a = jnp.where(fires, self._values(u, acc, col), jnp.zeros((), dt))
        col_a = jnp.where(fires, col, -1)
        parts = dict(slots=(col_a, val_a), viol=None, overflow=None, dense=None)
        if not with_viol:
            return parts
        excess = proj - self.viol_margin
        V = int(math.ceil(_VIOL_SLACK * B * self.viol_expected + 32))  # the batch's violation slots
        rows_v, vi, live, overflow = _compact(excess > 0, V)
        vcol = Z + vi
        proj_v = proj[rows_v, vi]
        p_v = self._prob_given(proj_v, vcol)
        q_v = self.cand_prob[vi]
        r = jnp.where(live, jnp.maximum(p_v - q_v, 0.0) / (1.0 - q_v), 0.0)
        r_u = _rng.uniform(k_res, (V,), dt)
        val_r = self._values(r_u, r, vcol)
        # The union: a feature that already fired as a candidate (u < acc, whatever the sign of
        # its magnitude) keeps that draw ([V, K] compare with the row's candidates instead of
        # reading a dense block).
        col_fired = jnp.where(first & (u < acc), col, -1)
        fired = jnp.any(col_fired[rows_v] == vcol[:, None], axis=1)
        write = live & ~fired & (r_u < r * pos_frac[vcol])

        def dense():
            p = self._prob_given(proj, slice(Z, n))
            return self._values(_rng.uniform(k_dense, (B, m), dt), p, slice(Z, n))

        parts.update(viol=(rows_v, jnp.where(write, vcol, -1), jnp.where(write, val_r, 0.0)), overflow=overflow,
                     dense=dense)
        return parts

    def _free_block(self, parts: dict, B: int) -> jax.Array:
        """The dense values ``[B, n - Z]`` of the sparse free block from :meth:`_sparse_free`."""
        Z, m = self.sparse_start, self.n_features - self.sparse_start
        cols, vals = parts["slots"]
        rows = jnp.broadcast_to(jnp.arange(B)[:, None], cols.shape)
        out = jnp.zeros((B, m), vals.dtype).at[rows, jnp.where(cols >= 0, cols - Z, m)].set(vals, mode="drop")
        if parts["viol"] is None:
            return out
        rows_v, vcol, val_r = parts["viol"]
        sparse = lambda: out.at[rows_v, jnp.where(vcol >= 0, vcol - Z, m)].set(val_r, mode="drop")  # noqa: E731
        return jax.lax.cond(parts["overflow"], parts["dense"], sparse)

    @jit_when_eager
    def sample_features(self, key: jax.Array, batch_size: int) -> jax.Array:
        """Coefficients ``f [B, n]`` (module docstring, items 2-5). Jit-able."""
        if self.uses_native():
            return self._native_draw(key, batch_size, True)
        return self._assemble(self._parts(key, batch_size), batch_size)

    def _parts(self, key: jax.Array, batch_size: int) -> dict:
        """The batch's draw as active sets, drawn top down so that random numbers are drawn only where the
        result can depend on them.

        Conditional on the copula's factor draw ``eps [B, rank]`` the features fire independently
        (``_fire_prob``), so: the roots and the frequent free features draw one uniform each
        (``_values``), the rare free features are drawn sparsely (``_sparse_free``);
        a child's firing only matters when its parent is active, so children are drawn per parent
        *slot*: level 1 has one slot per root, level L+1 one per surviving level-L child (a
        mutually exclusive parent keeps at most one child, so a level where every parent is
        exclusive or has one child keeps one slot per parent slot; otherwise ``b_max`` per parent
        slot). Per slot: the children's uniforms ``[B, S, b_max]`` give firing and magnitude as for
        the roots; a child competes if its value is > 0 and its parent is active (value > 0); for
        an exclusive parent one competitor, chosen uniformly by one more uniform per slot,
        survives; survivors are scaled by ``f_parent / mu_parent`` (``scale_children_by_parent``)
        or gated. This is the reference's level-by-level gating and exclusion, in distribution
        exactly: the children of inactive parents, which it draws and then zeroes, are not drawn.
        ``slots``: per level ``(cols, vals)``, ``[B, S]`` (the survivor of each slot) for a reducible
        level, else ``[B, S, b]``; -1 / 0 where empty."""
        dt = self.W_p.dtype
        n, R, T = self.n_features, self.n_roots, self.tree_end
        B = batch_size
        k_eps, k_u, k_free = jax.random.split(key, 3)
        eps = proj = None
        if self.corr_factor is not None:
            eps = jax.random.normal(k_eps, (B, self.corr_factor.shape[1]), dt)
            proj = eps @ self.corr_factor[:T].T  # the tree's projections [B, T], read per level
        # Every fixed-shape uniform of the draw in one call (jsdl.data.rng: the unrolled
        # Threefry-2x32 keeping both words): roots and frequent free features, then per level
        # [S, b] + [S], then the sparse block's gaps and acceptance uniforms.
        Z = self.sparse_start
        n_top = R + (Z - T)
        b_max = self.children.shape[1]
        widths, S = [], R
        for L in range(self.depth):
            widths.append(S * b_max + S)
            S = S if self.reducible[L] else S * b_max
        K = self.n_arrivals if Z < n else 0
        W = n_top + sum(widths) + 2 * K
        u_all = _rng.uniform(k_u, (B, W), dt)
        u = u_all[:, :n_top]
        pos = n_top
        # Roots and the frequent free features [T, Z): one uniform each. The rare free features
        # [Z, n) are drawn sparsely (_sparse_free).
        top = jnp.concatenate([jnp.arange(R), jnp.arange(T, Z)]) if R and T < Z else None
        if R == 0 or T == Z:
            sl = slice(0, R) if T == Z else slice(T, Z)
            v_top = self._values(u, self._fire_prob(eps, sl), sl)
        else:
            p = jnp.concatenate([self._fire_prob(eps, slice(0, R)), self._fire_prob(eps, slice(T, Z))], axis=1)
            v_top = self._values(u, p, top)
        roots = v_top[:, :R]
        free = None
        if Z < n:
            o = W - 2 * K
            free = self._sparse_free(u_all[:, o:o + K], u_all[:, o + K:], k_free, eps)

        slots = []
        pc = jnp.broadcast_to(jnp.arange(R, dtype=jnp.int32), (B, R))  # parent slot columns
        pv = roots  # parent slot values

        pos_frac = self._positive_fraction()

        def level(pc, pv, uu, w, reduce):
            """One level: the children of the parent slots ``(pc, pv) [B, S]``. ``reduce`` (every
            parent keeps at most one child): ``(cols, vals) [B, S]``, the survivor of each slot
            (-1 / 0 where none), with the magnitude computed for the survivors only; otherwise
            ``[B, S, b]``."""
            safe = jnp.maximum(pc, 0)
            cc = jnp.where((pc >= 0)[..., None], self.children[safe], -1)  # [B, S, b]
            ok = cc >= 0
            cs = jnp.maximum(cc, 0)
            p = jnp.where(ok, self._fire_prob(eps, cs, proj), 0.0)
            comp = ok & (uu < p * pos_frac[cs]) & (pv > 0)[..., None]
            # Mutual exclusion: the m-th competitor (m uniform in 0..count-1) survives.
            cnt = jnp.sum(comp, axis=-1)
            pick = jnp.minimum(jnp.floor(w * cnt).astype(jnp.int32), jnp.maximum(cnt - 1, 0))
            rank = jnp.cumsum(comp, axis=-1) - 1
            excl = self.exclusive[safe] & (pc >= 0)
            keep = comp & (~excl[..., None] | (rank == pick[..., None]))
            factor = (pv / self.mean_mag[safe]) if self.rescale else jnp.ones_like(pv)
            if reduce:
                j = jnp.argmax(keep, axis=-1)[..., None]
                one = lambda a: jnp.take_along_axis(a, j, axis=-1)[..., 0]  # noqa: E731
                hit = jnp.any(keep, axis=-1)
                c1 = one(cc)
                val = jnp.where(hit, self._values(one(uu), one(p), jnp.maximum(c1, 0)) * factor, jnp.zeros((), dt))
                return jnp.where(hit, c1, -1), val
            val = jnp.where(keep, self._values(uu, p, cs) * factor[..., None], jnp.zeros((), dt))
            return jnp.where(keep, cc, -1), val

        if self.depth > 1 and all(self.reducible):
            # Every level has R slots: one compiled level under lax.scan (compiles ~depth x faster).
            width = R * b_max + R

            def body(carry, L):
                pc, pv = carry
                seg = jax.lax.dynamic_slice_in_dim(u_all, n_top + L * width, width, axis=1)
                out = level(pc, pv, seg[:, :R * b_max].reshape(B, R, b_max), seg[:, R * b_max:], True)
                return out, out

            _, (ccs, vals) = jax.lax.scan(body, (pc, pv), jnp.arange(self.depth))
            slots = [(ccs[L], vals[L]) for L in range(self.depth)]
        else:
            for L in range(self.depth):
                S = pc.shape[1]
                uu = u_all[:, pos:pos + S * b_max].reshape(B, S, b_max)
                w = u_all[:, pos + S * b_max:pos + S * b_max + S]
                pos += S * b_max + S
                cc, val = level(pc, pv, uu, w, self.reducible[L])
                slots.append((cc, val))
                pc, pv = cc.reshape(B, -1), val.reshape(B, -1)
        return dict(top=v_top, slots=slots, free=free)

    def _top_columns(self) -> np.ndarray:
        """The columns of ``_parts(...)["top"]``: the roots, then the frequent free features."""
        return np.concatenate([np.arange(self.n_roots), np.arange(self.tree_end, self.sparse_start)]).astype(np.int32)

    def _assemble(self, parts: dict, B: int) -> jax.Array:
        """The dense features ``f [B, n]`` of a draw (:meth:`_parts`)."""
        n, R, T = self.n_features, self.n_roots, self.tree_end
        v_top = parts["top"]
        dt = v_top.dtype
        blocks = [v_top[:, :R], jnp.zeros((B, T - R), dt), v_top[:, R:]]
        if parts["free"] is not None:
            blocks.append(self._free_block(parts["free"], B))
        f = jnp.concatenate([a for a in blocks if a.shape[1]], axis=1) if n else jnp.zeros((B, 0), dt)
        slots = parts["slots"]
        if slots:
            cols = jnp.concatenate([c.reshape(B, -1) for c, _ in slots], axis=1)
            vals = jnp.concatenate([v.reshape(B, -1) for _, v in slots], axis=1)
            rows = jnp.broadcast_to(jnp.arange(B)[:, None], cols.shape)
            f = f.at[rows, jnp.where(cols >= 0, cols, n)].set(vals, mode="drop")
        return jax.nn.relu(f)

    def decodes_rows(self) -> bool:
        return True  # draw sums the feature rows of its sparse block (decode_active)

    @jit_when_eager
    def draw(self, key: jax.Array, batch_size: int) -> Batch:
        """Fresh samples: ``features`` is exactly ``sample_features(k_x, B)`` (``k_x, _ =
        split(key)``, as :meth:`SamplingMixin.draw`), and ``x_p = f W_p^T + bias`` is summed from
        the active sets (the roots and frequent free features as one small product, the tree's and
        the sparse block's survivors with :func:`jsdl.data.bench.decode_active`, the violations as
        a segment sum), equal to ``observe(features)`` up to float rounding. The dense ``[B, n]``
        features are then only computed if the caller uses them (in a training step they are
        not). If the sparse block overflowed its violation slots, or the active sets are not much
        smaller than ``n`` (:func:`jsdl.data.bench.use_sparse_decode`), ``x_p`` is the dense
        product."""
        B, n = batch_size, self.n_features
        k_x, _ = jax.random.split(key)
        if self.uses_native():  # two calls of one stream: XLA drops the features' when unused
            x_p = self._native_draw(k_x, B, False)
            return Batch(x_p=x_p, x_r=x_p, features=self._native_draw(k_x, B, True))
        parts = self._parts(k_x, B)
        feats = self._assemble(parts, B)
        slots = list(parts["slots"])
        free = parts["free"]
        if free is not None:
            slots.append(free["slots"])
        J = sum(int(np.prod(c.shape[1:])) for c, _ in slots)
        if not slots or not use_sparse_decode(J, n):
            return self.observe(feats)
        dt = feats.dtype
        W_rows = self.feature_rows("W_p")  # [n, d]
        cols = jnp.concatenate([c.reshape(B, -1) for c, _ in slots], axis=1)
        vals = jnp.concatenate([v.reshape(B, -1) for _, v in slots], axis=1)
        # The live slots of each row first (decode_active stops after the batch's largest count).
        live = cols >= 0
        pos = jnp.where(live, jnp.cumsum(live, axis=1) - 1, J)
        rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, J))
        c1 = jnp.zeros((B, J), jnp.int32).at[rows, pos].set(cols.astype(jnp.int32), mode="drop")
        v1 = jnp.zeros((B, J), dt).at[rows, pos].set(vals, mode="drop")
        x = parts["top"] @ W_rows[self._top_columns()] if parts["top"].shape[1] else jnp.zeros((B, self.d_input), dt)
        x = x + decode_active(SparseCodes(v1, c1, None, n), jnp.sum(live, axis=1), W_rows)
        if free is not None and free["viol"] is not None:
            rows_v, vcol, val_r = free["viol"]
            x = x + jax.ops.segment_sum(val_r[:, None] * W_rows[jnp.maximum(vcol, 0)], rows_v, num_segments=B)
            # (the dense features are rebuilt inside the branch, so that they stay unneeded unless taken)
            x = jax.lax.cond(free["overflow"], lambda: self._assemble(parts, B) @ self.W_p.T, lambda: x)
        x_p = x + self.bias
        return Batch(x_p=x_p, x_r=x_p, features=feats)

    def observe(self, x: jax.Array, key: Optional[jax.Array] = None) -> Batch:
        """``Batch(x_p = f W_p^T + bias, x_r = x_p, features = f)``; noiseless (``key`` unused)."""
        x_p = x @ self.W_p.T + self.bias
        return Batch(x_p=x_p, x_r=x_p, features=x)

    # -- descriptions ------------------------------------------------------------------------------
    @property
    def sparsity(self) -> float:
        """1 - mean base firing probability (informational)."""
        return float(1.0 - jnp.mean(self.probs))

    def feature_weights(self, key: Optional[jax.Array] = None, n_samples: int = 65536) -> jax.Array:
        """``M_d [n]`` of Thm 3.1, P(only feature d active) * E[f_d^2 | only d active], a Monte Carlo
        estimate from ``n_samples`` draws (default key: PRNGKey(0)). Children never fire alone."""
        return self._alone_weights_mc(jax.random.PRNGKey(0) if key is None else key, n_samples)

    def feature_norms(self) -> jax.Array:
        return jnp.linalg.norm(self.W_p, axis=0)

    def config(self) -> dict:
        return dict(kind=self.kind, n_features=self.n_features, d_input=self.d_input, method=self.method,
                    n_sources=1, depth=self.depth, mean_prob=float(jnp.mean(self.probs)),
                    sampler="native" if self.uses_native() else "jax", synth=self.settings.to_dict())


# Candidate rates of the sparse free block: q_i = P(fire | factor projection c sd out), c below.
_CAND_SIGMA = 3.0
# The free features before the first with a candidate rate <= this are drawn densely.
_DENSE_RATE = 0.2
# A batch has room for this many times its expected number of violations (+32).
_VIOL_SLACK = 2.0
# Per-sample probability that the Poisson arrivals of the sparse block are truncated.
_TRUNCATION = 1e-15


def _compact(mask: jax.Array, size: int, block: int = 32):
    """The ``True`` entries of ``mask [B, m]`` in row-major order, as ``(rows [size], cols [size],
    live [size], overflow)``: ``live`` marks the slots that hold an entry (the first
    ``min(count, size)``), ``overflow`` whether there are more than ``size``. Works on per-block
    counts (blocks of ``block`` columns) and a search per slot, so the only ``[B, m]`` work is
    one reduction (``jnp.nonzero`` scans the whole flattened mask: measured ~10x slower)."""
    B, m = mask.shape
    nb = -(-m // block)
    mb = jnp.pad(mask, ((0, 0), (0, nb * block - m))).reshape(B * nb, block)
    cnt = jnp.sum(mb, axis=1, dtype=jnp.int32)  # [B nb]
    cum = jnp.cumsum(cnt)
    j = jnp.arange(size, dtype=jnp.int32)
    blk = jnp.minimum(jnp.searchsorted(cum, j, side="right"), B * nb - 1).astype(jnp.int32)
    rank = j - (cum[blk] - cnt[blk])  # rank of entry j inside its block
    bits = mb[blk]  # [size, block]
    within = jnp.argmax(bits & (jnp.cumsum(bits, axis=1, dtype=jnp.int32) - 1 == rank[:, None]), axis=1)
    live = j < cum[-1]
    return blk // nb, (blk % nb) * block + within.astype(jnp.int32), live, cum[-1] > size


def _sparse_free_tables(p: np.ndarray, thresholds: np.ndarray, F: Optional[np.ndarray], start: int) -> dict:
    """Host-side tables of :meth:`SynthBench._sparse_free` for the free features ``[start, n)``:
    the first free index drawn sparsely, cumulative candidate hazards ``H`` (float32, as used on
    device) and the candidate probabilities ``q`` they imply, the violation margins, the arrival
    capacity ``K`` and the violation capacity ``V``."""
    from scipy.special import ndtr, ndtri, pdtr, pdtrc, pdtrik

    n = p.shape[0]
    if F is None:
        q = p[start:].copy()  # raised below until the float32 intervals realise at least p
        norm = None
    else:
        norm = np.sqrt((F[start:] ** 2).sum(1))
        s = np.sqrt(1.0 - norm**2)
        q = ndtr((_CAND_SIGMA * norm - thresholds[start:]) / s)
    # The frequent prefix (probabilities are Zipf, descending) is drawn densely; a later feature
    # with a high candidate rate only costs arrivals.
    sparse = np.flatnonzero(q <= _DENSE_RATE)
    z = int(sparse[0]) if sparse.size else q.size
    Z = start + z
    q = q[z:]
    if q.size == 0:
        return dict(start=n, K=0, V=0.0, H=np.zeros(0, np.float32), q=np.zeros(0), margin=None)
    for margin in (1.0, 1.001, 1.01, 1.1, 2.0):
        H = np.cumsum(-np.log1p(-np.minimum(q * margin, 1.0 - 1e-7))).astype(np.float32)
        width = np.diff(np.concatenate([[0.0], H.astype(np.float64)]))
        q_eff = -np.expm1(-width)  # the candidate probabilities the float32 intervals realise
        if F is not None or np.all(q_eff >= p[Z:]):
            break
    # K: one above scipy.stats.poisson.isf(_TRUNCATION, mu) (its formula: importing scipy.stats costs
    # ~1 s), raised until P(Poisson(mu) > K) < _TRUNCATION.
    mu, p_hi = float(H[-1]), 1.0 - _TRUNCATION
    k_up = np.ceil(pdtrik(p_hi, mu))
    k_lo = max(k_up - 1.0, 0.0)
    K = int(k_lo if pdtr(k_lo, mu) >= p_hi else k_up) + 1
    while pdtrc(K, mu) >= _TRUNCATION:
        K += 1
    if F is None:
        if np.any(q_eff < p[Z:]):  # pragma: no cover
            raise AssertionError("sparse candidate rates below the firing probabilities")
        return dict(start=Z, K=K, V=0.0, H=H, q=q_eff, margin=None)
    Fz = F[Z:]
    nz = np.sqrt((Fz**2).sum(1))
    # P_i > q_i  <=>  (eps F^T)_i > thresholds_i - sqrt(1 - |F_i|^2) Phi^-1(1 - q_i)
    margin = thresholds[Z:] + np.sqrt(1.0 - nz**2) * ndtri(q_eff)
    expected = float(ndtr(-margin / np.maximum(nz, 1e-12)).sum())
    return dict(start=Z, K=K, V=expected, H=H, q=q_eff, margin=margin)


def _dev(x, dt) -> jax.Array:
    """``x`` as a device array of dtype ``dt``, converted on the host (a device-side conversion
    compiles a program per shape, and so does ``jnp.asarray`` of a host array here: make_synth
    compiled ~15 of them)."""
    return jax.device_put(np.asarray(x, dtype=np.dtype(dt)))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _construction_draws(key, n: int, d: int, rank: int, dt, bias):
    """The random draws of :func:`make_synth` in one compiled program (each eager draw of a new
    shape compiled its own, ~0.35 s apiece): the hierarchy's seed, the raw correlation factor
    ``[n, rank]``, the magnitude stds' normals ``[n]``, the feature vectors ``[n, d]`` and the
    bias ``[d]`` (a random direction of norm ``bias``; zeros for ``bias = 0``)."""
    k_h, k_c, k_s, k_v, k_b = jax.random.split(key, 5)
    seed = jax.random.randint(k_h, (), 0, 2**31 - 1)
    b = jax.random.normal(k_b, (d,), dt)
    b = b / jnp.maximum(jnp.linalg.norm(b), 1e-8) * bias
    return (seed, jax.random.normal(k_c, (n, rank)), jax.random.normal(k_s, (n,)),
            jax.random.normal(k_v, (n, d), dt), b)


def make_synth(key: jax.Array, config: Union[SynthConfig, str, Mapping[str, Any], None] = None,
               *, dtype: Any = None, sampler: str = "auto", **overrides: Any) -> SynthBench:
    """Build a :class:`SynthBench` from ``key`` and a :class:`SynthConfig` (or a preset name, or a
    mapping; default the 16k recipe), with keyword overrides of its fields. ``sampler``: ``"auto"``,
    ``"jax"`` or ``"native"`` (:meth:`SynthBench.uses_native`). The key decides the
    hierarchy's random choices, the correlation factor, the magnitude stds, the feature vectors
    and the bias (all on the host, once); ``sample(key, B)`` draws batches on device."""
    sampler = check_sampler(sampler)
    cfg = synth_config("16k" if config is None else config, **overrides)
    dt = jax.dtypes.canonicalize_dtype(jnp.float64 if dtype is None else dtype)  # float32 unless x64
    n, d = cfg.n_features, cfg.d_input
    seed, F_raw, s_raw, E, b = _construction_draws(key, n, d, max(cfg.correlation_rank, 1), jnp.dtype(dt),
                                                   float(max(cfg.bias, 0.0)))
    seed = int(seed)

    parent_of, level, exclusive = synth_hierarchy(cfg, seed)
    p = zipf_probabilities(n, cfg.zipf_exponent, cfg.max_prob, cfg.min_prob)
    if cfg.n_roots and cfg.compensate_probabilities:
        p = compensated_probabilities(p, parent_of, exclusive)
    from scipy.special import ndtri

    thresholds = ndtri(1.0 - p.astype(np.float64))  # +inf for p = 0, -inf for p = 1

    corr_factor = corr_sqrt_diag = None
    if cfg.correlation_rank > 0:
        F = np.asarray(F_raw, np.float64) * cfg.correlation_scale
        ss = (F**2).sum(1)
        cap = 1.0 - ss < _MIN_DIAG
        F[cap] *= np.sqrt((1.0 - _MIN_DIAG) / ss[cap])[:, None]
        corr_factor = _dev(F, dt)
        corr_sqrt_diag = _dev(np.sqrt(1.0 - (F**2).sum(1)), dt)

    mean_mag = np.linspace(cfg.magnitude_mean_start, cfg.magnitude_mean_end, n) if n > 1 else np.asarray(
        [cfg.magnitude_mean_start])
    std_mag = np.abs(cfg.magnitude_std_mean + cfg.magnitude_std_std * np.asarray(s_raw, np.float64))

    E = orthogonalize(E, cfg.orthogonalize_steps, cfg.orthogonalize_lr)

    depth = hierarchy_depth(parent_of)
    n_children = np.bincount(parent_of[parent_of >= 0], minlength=n)
    b_max = max(int(n_children.max()) if n else 0, 1)
    children = np.full((n, b_max), -1, np.int64)
    for c in np.flatnonzero(parent_of >= 0):  # breadth first: children in increasing order
        q = parent_of[c]
        children[q, np.argmax(children[q] < 0)] = c
    excl = exclusive & (n_children >= 2)
    n_roots = int((level == 0).sum())
    tree_end = int((level >= 0).sum())
    assert (level[:n_roots] == 0).all() and (level[tree_end:] == -1).all()  # breadth-first numbering
    # A level is reducible when each of its parents keeps at most one child.
    reducible = tuple(bool(np.all(excl[q] | (n_children[q] <= 1))) for q in
                      (np.flatnonzero(level == L) for L in range(depth)))

    # The rare free features [sparse_start, n) are drawn sparsely (SynthBench._sparse_free).
    sp = _sparse_free_tables(p.astype(np.float64), thresholds, None if corr_factor is None else F, tree_end)
    W = _dev(np.asarray(E).T, dt)  # on the host: an eager transpose would compile a program
    return SynthBench(
        W_p=W, W_r=W, bias=b, probs=_dev(p, dt), thresholds=_dev(thresholds, dt),
        mean_mag=_dev(mean_mag, dt), std_mag=_dev(std_mag, dt),
        parent_of=_dev(parent_of, np.int32), children=_dev(children, np.int32),
        exclusive=_dev(excl, bool), corr_factor=corr_factor, corr_sqrt_diag=corr_sqrt_diag, settings=cfg,
        depth=depth, n_roots=n_roots, tree_end=tree_end, reducible=reducible,
        rescale=cfg.scale_children_by_parent, sampler=sampler, sparse_start=sp["start"], n_arrivals=sp["K"],
        viol_expected=sp["V"], cand_hazard=_dev(sp["H"], dt), cand_prob=_dev(sp["q"], dt),
        viol_margin=None if sp["margin"] is None else _dev(sp["margin"], dt),
    )
