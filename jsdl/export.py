"""Export trained dictionaries to the SAELens format, and import them back.

SAELens (and SAEBench, sae-dashboard, Neuronpedia, which read it) stores an SAE as a directory with
``sae_weights.safetensors`` and ``cfg.json``. Weights use the *column-vector-on-the-right* layout::

    W_enc [d_in, d_sae]   b_enc [d_sae]   W_dec [d_sae, d_in]   b_dec [d_in]   threshold [d_sae]

and SAELens encodes ``sigma((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc)``, decodes
``f @ W_dec + b_dec``. jsdl (paper eqs. 1-2) encodes ``sigma(x W_E^T + b_E)`` with ``W_E [n_q, n_p]``
(``sigma((x - b_D) W_E^T + b_E)`` for a ``pre_bias`` spec) and decodes ``x_q W_D^T + b_D`` with
``W_D [n_r, n_q]``, so the map is

    W_enc = W_E^T,  W_dec = W_D^T (W_E for a tied model),  b_enc = b_E,  b_dec = b_D,
    apply_b_dec_to_input = pre_bias   (False unless the spec subtracts b_D before encoding).

Architectures (``cfg["architecture"]``):

=============  ============================================  =========================================
jsdl sigma     SAELens                                        notes
=============  ============================================  =========================================
relu           ``standard``                                   ReLU
topk           ``topk`` with ``k``,                           SAELens TopK keeps the k largest and
               ``rescale_acts_by_decoder_norm=False``         applies ReLU (jsdl ``relu=True``)
jumprelu       ``jumprelu`` with ``threshold``                SAELens masks on ``threshold.relu()``:
                                                              exact for thresholds >= 0
batchtopk      ``jumprelu``, threshold = the inference        as SAELens saves BatchTopK SAEs; exact
               threshold (as SAELens saves BatchTopK)         for jsdl's ``inference=True`` encode
=============  ============================================  =========================================

The full jsdl spec (activation, penalties, bias, tying, matryoshka prefixes, ...) is kept under
``cfg["metadata"]["jsdl"]``, so :func:`import_saelens` rebuilds exactly what was exported (the
round trip is bit-exact); SAELens ignores that entry. Files written by SAELens itself (no jsdl
metadata) import too: ``apply_b_dec_to_input=True`` is folded into ``b_E = b_enc - b_dec W_enc``
and TopK's ``rescale_acts_by_decoder_norm`` into the weights (exact up to float rounding).

Normalisation: training on activations scaled by ``s_p`` (input) and ``s_r`` (target), e.g. unit
mean squared norm (:class:`jsdl.data.files.ActivationFiles` with ``normalize=True``), is folded
back at export, as SAELens' ``fold_activation_norm_scaling_factor`` does, so the exported SAE acts
on raw activations: ``W_E <- s_p W_E``, ``W_D <- W_D / s_r``, ``b_D <- b_D / s_r`` (pre-activations,
hence thresholds, are unchanged).

CLI: ``jsdl export --format saelens RUN_DIR OUT_DIR`` (a run directory written by
``jsdl.train.fit(..., out_dir=...)`` / ``jsdl train``) or ``jsdl export --check SAELENS_DIR`` to
import a SAELens directory and print what it holds.

Safety: the output directory must be new or empty (``--force`` / ``force=True`` to overwrite); a run
that did not finish is refused unless a step is named (``--step N``) or ``--allow-unfinished`` is
given; ``cfg["metadata"]["jsdl_run"]`` records the run directory, the exported step, whether the
run had finished and the normalisation that was folded in. Plug-ins the run was trained with
(``jsdl --import``) are imported again from run.json.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

__all__ = [
    "SAELENS_ARCHITECTURES",
    "to_saelens",
    "from_saelens",
    "export_saelens",
    "import_saelens",
    "export_run",
    "fold_normalization",
    "spec_to_dict",
    "spec_from_dict",
    "add_arguments",
    "run",
]

SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
SAE_CFG_FILENAME = "cfg.json"
# SAELens >= 6 reads the nested-metadata layout only when it finds a version >= 6.0.0 there.
SAELENS_FORMAT_VERSION = "6.0.0"
JSDL_FORMAT = 1

#: jsdl activation name -> SAELens inference architecture.
SAELENS_ARCHITECTURES = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
_EXPORTABLE_METHODS = ("sae", "tied_sae", "matryoshka")


# ------------------------------------------------------------------------------------------------
# Specs as JSON
# ------------------------------------------------------------------------------------------------


# spec <-> JSON lives with the spec (jsdl.objective); re-exported here for callers of jsdl.export.
from jsdl.objective import spec_from_dict, spec_to_dict  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Normalisation folding
# ------------------------------------------------------------------------------------------------


def fold_normalization(params, spec, input_scale: float | None = None, target_scale: float | None = None):
    """Parameters acting on raw activations, from ones trained on ``x_p * input_scale`` ->
    ``x_r * target_scale``: ``W_E <- s_p W_E``, ``W_D <- W_D / s_r``, ``b_D <- b_D / s_r``,
    ``W_S <- W_S s_p / s_r`` (``b_E`` and thresholds act on pre-activations, which are unchanged).

    ``target_scale`` defaults to ``input_scale`` (an SAE). A tied model with a scale != 1 is untied
    (returned with ``W_D`` set), since the folded encoder and decoder differ."""
    import jax.numpy as jnp

    s_p = 1.0 if input_scale is None else float(input_scale)
    s_r = s_p if target_scale is None else float(target_scale)
    for nm, v in (("input_scale", s_p), ("target_scale", s_r)):
        if not (v > 0 and np.isfinite(v)):
            raise ValueError(f"{nm} must be a positive finite number, got {v!r}")
    if s_p == 1.0 and s_r == 1.0:
        return params
    W_D = params.decoder
    return params.replace(
        W_E=params.W_E * jnp.asarray(s_p, params.W_E.dtype),
        W_D=W_D / jnp.asarray(s_r, W_D.dtype),
        b_D=None if params.b_D is None else params.b_D / jnp.asarray(s_r, params.b_D.dtype),
        W_S=None if params.W_S is None else params.W_S * jnp.asarray(s_p / s_r, params.W_S.dtype),
    )


# ------------------------------------------------------------------------------------------------
# jsdl <-> SAELens
# ------------------------------------------------------------------------------------------------


def _np(a, dtype=None):
    out = np.asarray(a)
    return out.astype(dtype) if dtype is not None and out.dtype != np.dtype(dtype) else out


def _check_exportable(params, spec):
    if spec.method not in _EXPORTABLE_METHODS:
        raise ValueError(
            f"SAELens export supports SAEs (methods {', '.join(_EXPORTABLE_METHODS)}), not method {spec.method!r}"
        )
    act = spec.activation.name
    if act not in SAELENS_ARCHITECTURES:
        raise ValueError(
            f"SAELens export supports activations {sorted(SAELENS_ARCHITECTURES)}, not {act!r}"
        )
    hyper = spec.activation.hyper_dict()
    if act in ("topk", "batchtopk") and not hyper.get("relu", True):
        raise ValueError(f"activation {act!r} with relu=False keeps negative codes; SAELens' {act} applies ReLU")
    if params.W_E.ndim != 2:
        raise ValueError(
            f"export one model at a time: params.W_E has shape {tuple(params.W_E.shape)} "
            "(a population? index it first, e.g. jax.tree.map(lambda a: a[i], params))"
        )
    if params.W_S is not None:
        raise ValueError("params carry a skip W_S, which SAELens SAEs do not have")
    if act in ("jumprelu", "batchtopk"):
        th = params.threshold
        if th is None:
            raise ValueError(f"activation {act!r} needs params.threshold to export")
        if np.any(np.asarray(th) < 0):
            raise ValueError(
                f"{int(np.sum(np.asarray(th) < 0))} {act} thresholds are negative: jsdl then keeps negative codes "
                "but SAELens clamps thresholds at 0 (threshold.relu()); the export would not be equivalent"
            )


def to_saelens(params, spec, *, input_scale: float | None = None, target_scale: float | None = None,
               metadata: Mapping[str, Any] | None = None, dtype: str | None = None) -> tuple[dict, dict]:
    """``(state_dict, cfg)`` in SAELens' names for an SAE with a relu/topk/batchtopk/jumprelu
    activation. Scales (see :func:`fold_normalization`) are folded in first; ``metadata`` is
    merged into ``cfg["metadata"]`` (e.g. ``model_name``, ``hook_name``)."""
    _check_exportable(params, spec)
    if spec.pre_bias and target_scale not in (None, input_scale):
        raise ValueError("a pre_bias model encodes x - b_D, so its input and target scales must be equal to fold")
    folded = input_scale not in (None, 1.0) or target_scale not in (None, 1.0)
    params = fold_normalization(params, spec, input_scale, target_scale)
    n_q, d_in = params.W_E.shape
    W_dec = _np(params.decoder).T  # [d_sae, d_in]
    state = {
        "W_enc": _np(params.W_E).T,
        "W_dec": W_dec,
        "b_enc": _np(params.b_E) if params.b_E is not None else np.zeros((n_q,), W_dec.dtype),
        "b_dec": _np(params.b_D) if params.b_D is not None else np.zeros((d_in,), W_dec.dtype),
    }
    act = spec.activation.name
    arch = SAELENS_ARCHITECTURES[act]
    if arch == "jumprelu":
        th = _np(params.threshold)
        state["threshold"] = np.broadcast_to(th, (n_q,)).copy() if th.shape != (n_q,) else th
    dtype = np.dtype(dtype) if dtype is not None else W_dec.dtype  # default: the params' own dtype
    state = {k: np.ascontiguousarray(_np(v, dtype)) for k, v in state.items()}

    spec_rec = spec_to_dict(spec)
    if folded:
        # The folded weights are no longer tied and act on raw data: record what was exported.
        spec_rec["tied"] = False
        if spec.method == "tied_sae":
            spec_rec["method"] = "sae"
    jsdl_meta = {
        "format": JSDL_FORMAT,
        "spec": spec_rec,
        "bias": spec.bias,
        "tied": spec.tied and not folded,
        "threshold_shape": None if params.threshold is None else list(np.shape(params.threshold)),
        "folded_normalization": {"input_scale": input_scale, "target_scale": target_scale} if folded else None,
    }
    meta = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": SAELENS_FORMAT_VERSION,
        "model_name": None,
        "hook_name": None,
        "hook_head_index": None,
        "prepend_bos": True,
        "dataset_path": None,
        "context_size": None,
        "neuronpedia_id": None,
        **dict(metadata or {}),
        "jsdl": jsdl_meta,
    }
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": int(d_in),
        "d_sae": int(n_q),
        "dtype": str(np.dtype(dtype)),
        "device": "cpu",
        # jsdl encodes sigma(W_E x + b_E), or sigma(W_E (x - b_D) + b_E) for a pre_bias spec.
        "apply_b_dec_to_input": bool(spec.pre_bias),
        # Normalisation, if any, is folded into the weights above.
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    }
    if arch == "topk":
        cfg["k"] = int(spec.activation.hyper_dict()["k"])
        cfg["rescale_acts_by_decoder_norm"] = False
    return state, cfg


def from_saelens(state: Mapping[str, Any], cfg: Mapping[str, Any]):
    """``(params, spec)`` from a SAELens state dict and cfg (see the module docstring)."""
    state = {k: np.asarray(v) for k, v in state.items()}
    for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if k not in state:
            raise ValueError(f"SAELens weights lack {k!r} (have {sorted(state)})")
    meta = dict(cfg.get("metadata") or {})
    jm = meta.get("jsdl")
    arch = cfg.get("architecture", "standard")
    W_enc, W_dec, b_enc, b_dec = state["W_enc"], state["W_dec"], state["b_enc"], state["b_dec"]
    d_in, d_sae = W_enc.shape
    if W_dec.shape != (d_sae, d_in) or b_enc.shape != (d_sae,) or b_dec.shape != (d_in,):
        raise ValueError(
            f"inconsistent SAELens weight shapes: W_enc {W_enc.shape}, W_dec {W_dec.shape}, "
            f"b_enc {b_enc.shape}, b_dec {b_dec.shape}"
        )
    for k in ("d_in", "d_sae"):
        if k in cfg and int(cfg[k]) != {"d_in": d_in, "d_sae": d_sae}[k]:
            raise ValueError(f"cfg {k}={cfg[k]} does not match the weights (W_enc has shape {W_enc.shape})")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise ValueError(
            f"normalize_activations={norm!r}: jsdl has no run-time normalisation; fold the scaling factor first "
            "(SAELens: sae.fold_activation_norm_scaling_factor(s)) and save again"
        )
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise ValueError(f"reshape_activations={cfg['reshape_activations']!r} is not supported")
    if cfg.get("finetuning_scaling_factor"):
        raise ValueError("finetuning_scaling_factor is not supported")

    if jm is not None:
        return _from_jsdl_export(state, cfg, jm)
    return _from_native_saelens(state, cfg, arch)


def _from_jsdl_export(state, cfg, jm):
    """A directory written by :func:`export_saelens`: the recorded spec and params, bit-exact."""
    import jax.numpy as jnp

    from jsdl.objective import SDLParams

    W_enc, W_dec, b_enc, b_dec = state["W_enc"], state["W_dec"], state["b_enc"], state["b_dec"]
    spec = spec_from_dict(jm["spec"])
    th_shape = jm.get("threshold_shape")
    threshold = None
    if th_shape is not None:
        if "threshold" not in state:
            raise ValueError("jsdl metadata says the model has a threshold but the weights have none")
        threshold = state["threshold"]
        if tuple(th_shape) != threshold.shape:
            threshold = threshold.reshape(-1)[: int(np.prod(th_shape))].reshape(th_shape) if th_shape else threshold[0]
    if bool(cfg.get("apply_b_dec_to_input", True)) != spec.pre_bias:
        raise ValueError(f"a jsdl export of this spec has apply_b_dec_to_input={spec.pre_bias}; this cfg.json "
                         "was edited")
    params = SDLParams(
        W_E=jnp.asarray(W_enc.T),
        W_D=None if spec.tied else jnp.asarray(W_dec.T),
        b_E=jnp.asarray(b_enc) if spec.bias else None,
        b_D=jnp.asarray(b_dec) if spec.bias else None,
        threshold=None if threshold is None else jnp.asarray(threshold),
    )
    return params, spec


def _from_native_saelens(state, cfg, arch):
    """A directory written by SAELens: ``apply_b_dec_to_input`` and TopK's decoder-norm rescaling
    are folded into the weights."""
    import jax.numpy as jnp

    from jsdl.objective import SDLParams, make_spec

    W_enc, W_dec, b_enc, b_dec = state["W_enc"], state["W_dec"], state["b_enc"], state["b_dec"]
    d_sae = W_enc.shape[1]
    f64 = np.float64
    W_E = W_enc.T.astype(f64)
    b_E = b_enc.astype(f64)
    W_D = W_dec.T.astype(f64)
    if cfg.get("apply_b_dec_to_input", True):
        # (x - b_dec) W_enc + b_enc = x W_enc + (b_enc - b_dec W_enc)
        b_E = b_E - b_dec.astype(f64) @ W_enc.astype(f64)
    threshold = None
    if arch == "standard":
        spec = make_spec("sae", "relu", n_latents=int(d_sae))
    elif arch == "topk":
        if cfg.get("rescale_acts_by_decoder_norm", False):
            # hidden_pre * ||W_dec_i|| and codes / ||W_dec_i|| in decode: fold into the weights.
            nrm = np.linalg.norm(W_dec.astype(f64), axis=1)
            W_E, b_E, W_D = W_E * nrm[:, None], b_E * nrm, W_D / nrm[None, :]
        spec = make_spec("sae", "topk", n_latents=int(d_sae), k=int(cfg.get("k", 100)))
    elif arch == "jumprelu":
        if "threshold" not in state:
            if "log_threshold" not in state:
                raise ValueError("a jumprelu SAE needs 'threshold' (or 'log_threshold') weights")
            threshold = np.exp(state["log_threshold"].astype(f64))
        else:
            threshold = np.maximum(state["threshold"].astype(f64), 0.0)  # SAELens uses threshold.relu()
        spec = make_spec("sae", "jumprelu", n_latents=int(d_sae))
    else:
        raise ValueError(
            f"SAELens architecture {arch!r} is not supported (supported: standard, topk, jumprelu, batchtopk saved as jumprelu)"
        )
    dt = W_enc.dtype if np.issubdtype(W_enc.dtype, np.floating) else np.float32
    params = SDLParams(
        W_E=jnp.asarray(W_E.astype(dt)),
        W_D=jnp.asarray(W_D.astype(dt)),
        b_E=jnp.asarray(b_E.astype(dt)),
        b_D=jnp.asarray(b_dec.astype(dt)),
        threshold=None if threshold is None else jnp.asarray(threshold.astype(dt)),
    )
    return params, spec


def _check_out_dir(out_dir, force: bool) -> None:
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"output path {out_dir!r} is a file; give a directory to write (new or empty)")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        held = ", ".join(sorted(os.listdir(out_dir))[:4])
        raise ValueError(f"output directory {out_dir!r} is not empty (it holds {held}); choose a new directory or "
                         "pass --force (force=True) to overwrite")


def export_saelens(params, spec, out_dir: str, *, input_scale: float | None = None,
                   target_scale: float | None = None, normalization: Mapping[str, Any] | None = None,
                   metadata: Mapping[str, Any] | None = None, dtype: str | None = None, force: bool = False) -> str:
    """Write ``out_dir/sae_weights.safetensors`` and ``out_dir/cfg.json`` (SAELens format).

    ``normalization`` may be the ``"normalization"`` record of
    :meth:`jsdl.data.files.ActivationFiles.info` (its ``input_scale``/``target_scale`` are folded in).
    ``out_dir`` must be new or empty unless ``force``."""
    from jsdl.data.files import write_safetensors

    _check_out_dir(out_dir, force)
    if normalization:
        input_scale = normalization.get("input_scale", input_scale)
        target_scale = normalization.get("target_scale", target_scale)
    state, cfg = to_saelens(params, spec, input_scale=input_scale, target_scale=target_scale,
                            metadata=metadata, dtype=dtype)
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, SAE_WEIGHTS_FILENAME), state, metadata={"format": "pt"})
    with open(os.path.join(out_dir, SAE_CFG_FILENAME), "w") as f:
        json.dump(cfg, f, indent=2)
    return out_dir


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from jsdl.data.shards import ST_FLOAT_DTYPES, np_dtype, safetensors_header

    header, base, size = safetensors_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, t in header.items():
            if name == "__metadata__":
                continue
            code = t.get("dtype")
            if code not in ST_FLOAT_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has dtype {code!r}; expected a float dtype")
            a, b = t["data_offsets"]
            if base + b > size:
                raise ValueError(f"{path}: truncated (tensor {name!r} ends at byte {base + b}, file has {size})")
            f.seek(base + a)
            buf = f.read(b - a)
            out[name] = np.frombuffer(buf, dtype=np_dtype(ST_FLOAT_DTYPES[code]).newbyteorder("<")).reshape(t["shape"]).copy()
    return out


def import_saelens(path: str):
    """``(params, spec)`` from a SAELens directory (``sae_weights.safetensors`` + ``cfg.json``)."""
    wpath = os.path.join(path, SAE_WEIGHTS_FILENAME)
    cpath = os.path.join(path, SAE_CFG_FILENAME)
    for p in (wpath, cpath):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"SAELens directory {path}: {os.path.basename(p)} is missing")
    with open(cpath) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cpath}: not valid JSON ({e})") from None
    return from_saelens(_read_safetensors(wpath), cfg)


# ------------------------------------------------------------------------------------------------
# Run directories and the CLI
# ------------------------------------------------------------------------------------------------


def _normalization_of(info: Mapping[str, Any]) -> dict | None:
    """The normalisation record of a run's info dict, wherever the run stored it."""
    for path in (("data", "normalization"), ("record", "data", "normalization"), ("normalization",),
                 ("record", "normalization")):
        cur: Any = info
        for k in path:
            cur = cur.get(k) if isinstance(cur, Mapping) else None
        if cur:
            return dict(cur)
    return None


def export_run(run_dir: str, out_dir: str, *, format: str = "saelens", member: int | None = None,
               metadata: Mapping[str, Any] | None = None, step: int | None = None, allow_unfinished: bool = False,
               force: bool = False) -> str:
    """Export the parameters of a run directory (``jsdl.train.load_run``): the final ones of a
    finished run, or those of checkpoint ``step``; an unfinished run without ``step`` is refused
    unless ``allow_unfinished`` (its latest checkpoint is exported). A population run needs
    ``member`` (the index along the leading axis; the member's own k and coefficients are
    recorded). Normalisation recorded by the data source (``info["data"]["normalization"]``, or
    ``info["record"]["data"]["normalization"]`` when the run was given
    ``record={"data": source.info()}``) is folded into the weights. ``out_dir`` must be new or
    empty unless ``force``."""
    if format != "saelens":
        raise ValueError(f"unknown export format {format!r}; available: saelens")
    _check_out_dir(out_dir, force)
    from jsdl.train import load_run

    params, spec, info = load_run(run_dir, step)
    if step is None and not info["finished"] and not allow_unfinished:
        raise ValueError(
            f"run {run_dir} did not finish: its latest checkpoint is step {info['step']} of "
            f"train.steps={info['config'].steps}; resume it (jsdl train --resume {run_dir}), or export that "
            f"checkpoint with --step {info['step']} (step=...) or --allow-unfinished"
        )
    import jax

    if params.W_E.ndim == 3:
        if member is None:
            raise ValueError(
                f"run {run_dir} holds a population of {params.W_E.shape[0]} models; pass member=i (--member i)"
            )
        n = params.W_E.shape[0]
        if not 0 <= member < n:
            raise ValueError(f"member={member} is out of range for a population of {n} models")
        params = jax.tree.map(lambda a: a[member], params)
        members = (info or {}).get("members")
        if members:
            # Members differ in penalty coefficients and k: export the member's own spec.
            m = members[member]
            d = spec_to_dict(spec)
            for name, c in (m.get("coefs") or {}).items():
                d["penalties"][name]["coef"] = c
            if m.get("k") is not None:
                d["activation_hyper"]["k"] = int(m["k"])
            spec = spec_from_dict(d)
    elif member not in (None, 0):
        raise ValueError(f"run {run_dir} holds one model; member={member} does not apply")
    norm = _normalization_of(info or {})
    run_meta = {"run_dir": os.path.abspath(run_dir), "step": info["step"], "finished": info["finished"],
                "train_steps": info["config"].steps, "member": member, "normalization": norm}
    meta = {"jsdl_run_dir": os.path.abspath(run_dir), "jsdl_run": run_meta, **dict(metadata or {})}
    return export_saelens(params, spec, out_dir, normalization=norm, metadata=meta, force=force)


def add_arguments(p) -> None:
    p.add_argument("run_dir", nargs="?", help="run directory written by `jsdl train` / jsdl.train.fit(out_dir=...)")
    p.add_argument("out_dir", nargs="?", help="directory to write (created)")
    p.add_argument("--format", default="saelens", choices=["saelens"], help="output format (default: saelens)")
    p.add_argument("--member", type=int, default=None, help="index of the model to export from a population run")
    p.add_argument("--model-name", default=None, help="cfg metadata model_name (e.g. the transformer's name)")
    p.add_argument("--hook-name", default=None, help="cfg metadata hook_name (where the activations came from)")
    p.add_argument("--check", metavar="SAELENS_DIR", default=None,
                   help="instead of exporting, import a SAELens directory and print what it holds")
    p.add_argument("--step", type=int, default=None, help="export the checkpoint of this step (default: the last)")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="export the latest checkpoint of a run that did not finish")
    p.add_argument("--force", action="store_true", help="write into a non-empty output directory (overwrite)")


def run(args) -> int:
    if args.check:
        params, spec = import_saelens(args.check)
        print(f"{args.check}: {spec.describe()}; W_E {tuple(params.W_E.shape)}")
        return 0
    if not args.run_dir or not args.out_dir:
        raise ValueError("usage: jsdl export --format saelens RUN_DIR OUT_DIR")
    meta = {k: v for k, v in (("model_name", args.model_name), ("hook_name", args.hook_name)) if v is not None}
    out = export_run(args.run_dir, args.out_dir, format=args.format, member=args.member, metadata=meta,
                     step=args.step, allow_unfinished=args.allow_unfinished, force=args.force)
    with open(os.path.join(out, SAE_CFG_FILENAME)) as f:
        run_meta = json.load(f)["metadata"]["jsdl_run"]
    state = "finished run" if run_meta["finished"] else f"UNFINISHED run (train.steps={run_meta['train_steps']})"
    print(f"wrote {os.path.join(out, SAE_WEIGHTS_FILENAME)} and {os.path.join(out, SAE_CFG_FILENAME)} "
          f"(step {run_meta['step']} of a {state})")
    return 0
