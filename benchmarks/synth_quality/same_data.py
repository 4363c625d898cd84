"""Both trainers on the same data: one SynthSAEBench instance, the same training samples in the same
order, the same initial weights, scored on the same evaluation samples.

``run.py`` gives each framework its own generator (jsdl's on device, SAELens's in torch), so a seed
pairs two different ground-truth instances and two sample streams: the per-seed differences it
reports mix the trainers with the instances. This script takes the instance out:

1. SAELens's ``SyntheticModel`` for the seed (``run.saelens_model_config``, seed ``1000 + s``)
   draws the training samples once (``--samples``, batches of ``--batch``) and the evaluation
   samples (features and inputs) once.
2. jsdl initialises the SAE (``jsdl.fit(..., stop_at=0)``: its default initialisation, unit-norm
   decoder columns and ``W_E = W_D^T``); the same weights are loaded into SAELens's training SAE.
3. SAELens trains with ``train_toy_sae`` fed the stored samples in order; jsdl trains with ``fit``
   on the same samples as an iterable of batches. Matched settings as ``run.py`` (Adam 0.9/0.999,
   constant learning rate, grad-norm clipping 1.0, AuxK for the TopK family, ``pre_bias=True``:
   jsdl encodes ``x - b_D`` as SAELens does), one coefficient for both (``--coefs``; the same model
   on the same data needs no per-framework calibration).
4. Both trained SAEs are scored by SAELens's ``eval_sae_on_synthetic_data`` on the stored
   evaluation samples (jsdl's weights loaded into a fresh SAELens training SAE of the same class, so
   BatchTopK is evaluated the same way for both, with ``rescale_acts_by_decoder_norm=False``: the
   forward jsdl trained; the rows also record jsdl's scores under SAELens's default forward).

SAELens's TopK family trains by default with ``rescale_acts_by_decoder_norm=True`` (the top-k
selects on ``h_i ||W_dec,i||``, the decoder uses unit directions): equal to the plain forward, with
equal gradients, while the decoder's columns have unit norm, different once they drift.
``--saelens-rescale false`` trains SAELens with the plain forward, the optimisation jsdl runs.

If the two trainers implement the same optimisation, the paired differences here are float
rounding amplified by training (the top-k and threshold decisions), centred on zero.

Usage (bench environment, ``make .venv-bench/.jsdl-bench-installed``)::

    nice .venv-bench/bin/python benchmarks/synth_quality/same_data.py --seeds 0,1,2,3,4 \\
        --archs topk,batchtopk,jumprelu,relu --out same_data.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _load_run():
    """``synth_quality/run.py`` (the matched settings and model builders of the main benchmark), by
    path: ``benchmarks/run.py`` has the same module name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("synth_quality_run", os.path.join(HERE, "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


R = _load_run()

ARCHS = ("topk", "batchtopk", "jumprelu", "relu", "matryoshka")
# SAELens's coefficients calibrated on its own generator at 1M samples (README, "calibrated at 1M"):
# the data here come from that generator, so both frameworks use them.
COEFS = {"jumprelu": 0.75, "relu": 1000.0}


def saelens_data(synth_cfg, seed, n_train, n_eval, batch):
    """``(model, x_train [n_train, d], f_eval [n_eval, n], x_eval [n_eval, d])`` from SAELens's
    generator for ``seed`` (torch seeded, so a rerun draws the same samples)."""
    import torch
    from sae_lens.synthetic import SyntheticModel

    torch.manual_seed(seed)
    model = SyntheticModel(R.saelens_model_config(synth_cfg, 1000 + seed), device="cpu")
    xs = []
    with torch.no_grad():
        for i in range(0, n_train, batch):
            xs.append(model.feature_dict(model.activation_generator.sample(min(batch, n_train - i))).numpy())
        torch.manual_seed(10_000 + seed)
        f_eval = model.activation_generator.sample(n_eval)
        x_eval = model.feature_dict(f_eval)
    return model, np.concatenate(xs), f_eval, x_eval


class _Stored:
    """Stored samples handed out in order, in the two roles ``train_toy_sae`` and
    ``eval_sae_on_synthetic_data`` draw from: called with a count (or ``sample(n)``) it is the
    activation generator (the stored features, or placeholders when only inputs are stored), called
    with those features it is the feature dictionary (the stored inputs)."""

    def __init__(self, x, f=None):
        import torch

        self.x, self.f, self.i, self.j = x, f, 0, 0
        self.feature_vectors = torch.zeros(1)  # only its device is read

    def sample(self, n):
        import torch

        if self.f is None:
            return torch.zeros((n, 1))
        out = self.f[self.j:self.j + n]
        self.j += n
        return out

    def __call__(self, arg):
        import torch

        if isinstance(arg, int):
            return self.sample(arg)
        n = arg.shape[0]
        if self.i + n > self.x.shape[0]:
            raise RuntimeError(f"stored samples exhausted: asked for {self.i + n} of {self.x.shape[0]}")
        out = self.x[self.i:self.i + n]
        self.i += n
        return out if isinstance(out, torch.Tensor) else torch.from_numpy(out)

    def eval(self):
        return self


def jsdl_state_dict(params, arch):
    """SAELens's training-SAE weights from jsdl params (``W_enc [d, n]``, ``W_dec [n, d]``; the
    JumpReLU threshold; BatchTopK's inference threshold stays out: both are scored as training SAEs,
    with the batch-level top-k)."""
    s = {"W_enc": np.asarray(params.W_E).T, "W_dec": np.asarray(params.decoder).T,
         "b_enc": np.asarray(params.b_E), "b_dec": np.asarray(params.b_D)}
    if arch == "jumprelu":
        s["threshold"] = np.broadcast_to(np.asarray(params.threshold), s["b_enc"].shape)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in s.items()}


def saelens_with(arch, n_q, k, d, coef, state, rescale=None):
    """A fresh SAELens training SAE of ``arch`` holding ``state`` (jsdl's weights); ``rescale`` as in
    ``run.saelens_sae``."""
    import torch

    sae = R.saelens_sae(arch, n_q, k, d, coef, rescale)
    own = sae.state_dict()
    for name, v in state.items():
        if name not in own or tuple(own[name].shape) != v.shape:
            raise ValueError(f"{arch}: weight {name} {v.shape} does not fit SAELens's {tuple(own.get(name, np.empty(0)).shape)}")
    missing = {name for name, _ in sae.named_parameters()} - set(state)
    if missing:
        raise ValueError(f"{arch}: SAELens parameters without a jsdl value: {sorted(missing)}")
    sae.load_state_dict({kk: torch.from_numpy(v.copy()) for kk, v in state.items()}, strict=False)
    return sae


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="topk,batchtopk,jumprelu,relu")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--eval-samples", type=int, default=50_000)
    ap.add_argument("--coefs", help='one coefficient per architecture for both frameworks, JSON (default %s)' % COEFS)
    ap.add_argument("--jumprelu-threshold", type=float, default=2.0)
    ap.add_argument("--saelens-rescale", choices=("default", "true", "false"), default="default",
                    help="SAELens's rescale_acts_by_decoder_norm for the TopK family while it trains (its default: "
                         "true; jsdl's forward: false). jsdl's weights are always scored with jsdl's own forward.")
    ap.add_argument("--out", default="same_data.json")
    a = ap.parse_args(argv)

    import jax
    import torch
    from sae_lens.synthetic import eval_sae_on_synthetic_data, train_toy_sae

    import jsdl
    from jsdl.data.synth import synth_config
    from jsdl.train import TrainConfig, fit

    torch.set_num_threads(1)
    archs = [s for s in a.archs.split(",") if s]
    for arch in archs:
        if arch not in ARCHS:
            raise SystemExit(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    coefs = dict(COEFS, **json.loads(a.coefs or "{}"))
    preset, n_q, _, batch, lr, _ = R.SCALES["cpu"]
    synth_cfg = synth_config(preset)
    R._SPEC["pre_bias"] = True
    R._SAELENS_INIT.update(decoder_init_norm=R.SAELENS_INIT["jsdl"], apply_b_dec_to_input=True)
    R.JUMPRELU["threshold"] = a.jumprelu_threshold
    rescale = {"default": None, "true": True, "false": False}[a.saelens_rescale]
    k = 8  # the true L0 of the 512 most frequent features of the recipe (8.33; run.py's k)
    steps = a.samples // batch
    n_train = steps * batch
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        t0 = time.perf_counter()
        model, x_train, f_eval, x_eval = saelens_data(synth_cfg, seed, n_train, a.eval_samples, batch)
        R.log(f"[same_data] seed {seed}: {n_train} training and {a.eval_samples} evaluation samples from SAELens's "
              f"generator in {time.perf_counter() - t0:.0f} s")
        E = model.feature_dict.feature_vectors.detach()

        def score(sae):
            from sae_lens.synthetic import FeatureDictionary

            feeds = _Stored(x_eval, f_eval)

            class Dict(FeatureDictionary):  # the stored evaluation inputs, in order
                def forward(self, acts):
                    return feeds(acts)

            fd = Dict(E.shape[0], E.shape[1], bias=False, initializer=None)
            fd.feature_vectors.data = E.clone()
            r = eval_sae_on_synthetic_data(sae, fd, feeds, num_samples=x_eval.shape[0], batch_size=batch).to_dict()
            cl = r.pop("classification")
            r.update(precision=cl["precision"], recall=cl["recall"], f1=cl["f1_score"])
            return {kk: float(v) for kk, v in r.items() if isinstance(v, (int, float, np.floating, np.integer))}

        for arch in archs:
            coef = coefs.get(arch, 0.0)
            spec = R.jsdl_spec(arch, n_q, k, synth_cfg.d_input, coef)
            cfg = TrainConfig(steps=steps, batch_size=batch, learning_rate=lr, grad_clip=1.0, dead_window=1000,
                              log_every=max(steps // 4, 1), progress=False)
            key = jax.random.PRNGKey(seed)
            batches = lambda: (jsdl.Batch(x_p=x_train[i * batch:(i + 1) * batch]) for i in range(steps))  # noqa: E731
            init, _ = fit(key, spec, batches(), cfg, stop_at=0)
            init_state = jsdl_state_dict(init.params, arch)
            # SAELens from jsdl's initial weights, on the stored samples in order.
            sae = saelens_with(arch, n_q, k, synth_cfg.d_input, coef, init_state, rescale)
            t = time.perf_counter()
            stored = _Stored(x_train)
            train_toy_sae(sae, stored, stored, training_samples=n_train, batch_size=batch,
                          lr=lr, device="cpu")
            wall_s = time.perf_counter() - t
            if stored.i != n_train:
                raise RuntimeError(f"SAELens read {stored.i} of the {n_train} stored samples")
            t = time.perf_counter()
            state, _ = fit(key, spec, batches(), cfg)
            wall_j = time.perf_counter() - t
            ours = saelens_with(arch, n_q, k, synth_cfg.d_input, coef, jsdl_state_dict(jax.device_get(state.params), arch),
                                rescale=False)  # jsdl's own forward (SAELens's default rescales the TopK family)
            theirs_w = {kk: v.detach().numpy() for kk, v in sae.state_dict().items() if kk in init_state}
            ours_w = jsdl_state_dict(jax.device_get(state.params), arch)
            rel = {kk: float(np.linalg.norm(ours_w[kk] - theirs_w[kk]) / max(np.linalg.norm(theirs_w[kk]), 1e-30))
                   for kk in ours_w}
            for fw, m, wall in (("jsdl", ours, wall_j), ("saelens", sae, wall_s)):
                r = score(m)
                r.update(arch=arch, framework=fw, seed=seed, coef=coef, k=k, samples=n_train, train_s=wall,
                         weights_rel_diff=rel)
                if fw == "jsdl" and arch in R.TOPK_FAMILY:  # what scoring under SAELens's default forward reads
                    rs = score(saelens_with(arch, n_q, k, synth_cfg.d_input, coef, ours_w, rescale=True))
                    r.update(mcc_rescaled_forward=rs["mcc"], f1_rescaled_forward=rs["f1"])
                rows.append(r)
                R.log(f"[same_data] seed {seed} {arch:10s} {fw:8s} MCC {r['mcc']:.4f} F1 {r['f1']:.4f} "
                      f"EV {r['explained_variance']:.4f} L0 {r['sae_l0']:.2f} dead {r['dead_latents']:.0f} | "
                      f"train {wall:.1f} s | weights rel. diff {max(rel.values()):.2g} | load {R.load_avg()}")
            with open(a.out, "w") as f:
                json.dump(dict(synth=synth_cfg.to_dict(), n_q=n_q, k=k, coefs=coefs, batch=batch, lr=lr,
                               jumprelu_threshold=a.jumprelu_threshold, saelens_rescale=a.saelens_rescale,
                               jsdl_scored="own forward (rescale_acts_by_decoder_norm=False)", rows=rows), f, indent=1)
    print(paired_table(rows))


def paired_table(rows) -> str:
    out = ["| arch | seeds | SAELens MCC / F1 | jsdl MCC / F1 | jsdl - SAELens MCC (seeds above) | jsdl - SAELens F1 (seeds above) | weights, rel. diff |",
           "|---|---|---|---|---|---|---|"]
    for arch in ARCHS:
        pairs = {}
        for r in rows:
            if r["arch"] == arch:
                pairs.setdefault(r["seed"], {})[r["framework"]] = r
        pairs = [p for p in pairs.values() if len(p) == 2]
        if not pairs:
            continue
        cell = {}
        for m in ("mcc", "f1"):
            j = np.array([p["jsdl"][m] for p in pairs])
            s = np.array([p["saelens"][m] for p in pairs])
            dlt = j - s
            cell[m] = (s.mean(), j.mean(), dlt.mean(), dlt.std(ddof=1) if len(dlt) > 1 else 0.0, int((dlt > 0).sum()))
        rel = np.median([max(p["jsdl"]["weights_rel_diff"].values()) for p in pairs])
        out.append(f"| {arch} | {len(pairs)} | {cell['mcc'][0]:.4f} / {cell['f1'][0]:.4f} | {cell['mcc'][1]:.4f} / "
                   f"{cell['f1'][1]:.4f} | {cell['mcc'][2]:+.4f} ± {cell['mcc'][3]:.4f} ({cell['mcc'][4]} of {len(pairs)}) | "
                   f"{cell['f1'][2]:+.4f} ± {cell['f1'][3]:.4f} ({cell['f1'][4]} of {len(pairs)}) | {rel:.2g} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
