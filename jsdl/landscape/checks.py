"""The numeric checks of the paper's claims (section 3 of arXiv 2512.05534), one function per
prediction P1-P14 of ``reference/paper-2512.05534.md`` section 8, each registered in
:data:`jsdl.landscape.claims.CHECKS` under its id.

Every ``check_*`` takes a PRNG key first, runs at a size that takes seconds on a laptop CPU on a
Linear Representation Bench (:func:`jsdl.data.make_bench`), and returns :class:`Record` s (see
:mod:`jsdl.landscape.claims` for the verdicts). Checks are written for float64
(``jax.enable_x64``); under float32 the zero tolerances widen automatically.
"""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

import jsdl
from jsdl import activations as _act
from jsdl.data import make_bench, max_interference
from jsdl.landscape import approx as _ax
from jsdl.landscape import hessian as _hs
from jsdl.landscape import stationary as _st
from jsdl.landscape.claims import CONDITIONAL, DEFERRED, FAILS, HOLDS, Record, as_float, register, zero_tol
from jsdl.landscape.constructions import (
    eigen_partial_optimum,
    example_3_5,
    point_with_margin,
    random_params,
    realizing_row,
    theorem_3_3_bounds,
    theorem_3_3_solution,
    theorem_3_6_literal,
    theorem_3_8_absorption,
    zero_loss_solution,
)
from jsdl.metrics import feature_recovery
from jsdl.objective import Batch, SDLParams

__all__ = ["check_loss_approximation", "check_default_regime", "check_decoder_block", "check_encoder_block", "check_lanczos", "check_theorem_3_3", "check_non_identifiability", "check_example_3_5", "check_theorem_3_6", "check_dead_latents", "check_theorem_3_8", "check_training_claims", "check_activation_property"]

_f = as_float

# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------


def _bench(key, n: int, n_p: int, max_interference: float, sparsity: float, method: str = "sae"):
    """The Linear Representation Bench (:func:`jsdl.data.make_bench`) of a check: ``n`` features
    in ``n_p`` dimensions."""
    return make_bench(key, n_features=n, d_input=n_p, max_interference=max_interference, sparsity=sparsity,
                      method=method)


def _bench_source(bench) -> str:
    return type(bench).__module__ + "." + type(bench).__name__


def _recovery(params: SDLParams, bench, tau: float = 0.95) -> dict:
    """:func:`jsdl.metrics.feature_recovery` (``|cos| > tau`` on encoder rows and decoder columns)."""
    r = feature_recovery(params, bench, threshold=tau)
    return {k: r[k] for k in ("m_gt", "m_ip", "m_gt_dec", "m_ip_dec")}


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------


@register("P1")
def check_loss_approximation(
    key, *, n: int = 8, n_p: int = 6, n_q: int = 10, sparsity: float = 0.95, n_per_m: int = 4096, mc_samples: int = 131072
):
    """P1: Theorem 3.1's bound, the (1-S)^2 scaling of ``L - L~`` and a plain Monte-Carlo check of
    the stratified estimator on the bench's own samples."""
    kb, kp, kg, km = jax.random.split(key, 4)
    bench = _bench(kb, n, n_p, 0.3, sparsity)
    law = _ax.SparseLaw.from_bench(bench)
    problem = _ax.FeatureProblem.from_bench(bench)
    params = random_params(kp, n_q, n_p, n_p)
    M_bench = np.asarray(bench.feature_weights(), dtype=np.float64)
    M_law = law.weights(n)
    one_minus = np.logspace(-4, np.log10(0.3), 14)
    S = 1 - one_minus
    gap = _ax.multi_feature_gap(kg, params, problem, law, S, n_per_m=n_per_m, m_max=n)
    C = gap["C_hat"]
    bound = _ax.theorem_3_1_bound(n, C, S)
    regime = one_minus <= 1.0 / n
    small = n * one_minus <= 0.05
    slope = float(np.polyfit(np.log(one_minus[small]), np.log(gap["gap"][small]), 1)[0])
    ratio = gap["gap"] / one_minus**2
    # plain Monte Carlo on the bench's own sampler at its own S, against the stratified value
    spec = _ax.spec_for(problem, n_q)
    mc, mc_se = _ax.mc_loss(km, params, spec, bench, n_samples=mc_samples, batch_size=min(mc_samples, 16384))
    strat = _ax.multi_feature_gap(kg, params, problem, law, [sparsity], n_per_m=n_per_m, m_max=n)
    L_strat, se_strat = float(strat["mean_loss"][0]), float(strat["gap_se"][0])
    z_mc = abs(mc - L_strat) / math.sqrt(mc_se**2 + se_strat**2)
    setting = {"bench": _bench_source(bench), "n": n, "n_p": n_p, "n_q": n_q, "c_min": law.c_min, "beta": law.beta,
               "params": "random Gaussian SAE (ReLU, no bias)", "one_minus_S": one_minus, "n_per_m": n_per_m}
    weights_ok = bool(np.allclose(M_bench, M_law, rtol=1e-5))
    bound_ok = bool(np.all(gap["gap"][regime] <= bound[regime]))
    recs = [
        Record(
            "P1",
            "Thm 3.1: |L_SDL - L~| <= n^2 C (1-S)^2 for (1-S) <= 1/n (C = sup of the per-sample loss)",
            setting,
            {"gap": gap["gap"][regime], "bound_n2C": bound[regime], "max_gap_over_bound": float(np.max(gap["gap"][regime] / bound[regime])),
             "C_hat": C, "M_d_bench_vs_formula_max_rel_err": float(np.max(np.abs(M_bench - M_law) / M_law))},
            "gap <= bound at every S with 1-S <= 1/n (C estimated by the largest loss seen with >= 2 features active; "
            "the true sup is infinite for Exp magnitudes)",
            HOLDS if bound_ok and weights_ok else FAILS,
            note="holds very loosely: the union bound counts n^2 pairs where C(n,2) ~ n^2/2 matter, and uses the sup "
                 "where the conditional mean e_2 is far smaller",
            data={"one_minus_S": one_minus, "gap": gap["gap"], "approx": gap["approx"], "mean_loss": gap["mean_loss"],
                  "bound": bound, "gap_se": gap["gap_se"]},
        ),
        Record(
            "P1.scaling",
            "[derived] L - L~ scales like (1-S)^2 when n(1-S) << 1",
            setting,
            {"loglog_slope_n(1-S)<=0.05": slope, "gap_over_(1-S)^2": ratio, "limit_C(n,2)*e_2": math.comb(n, 2) * gap["e_m"][0]},
            "slope in [1.9, 2.1]",
            HOLDS if 1.9 <= slope <= 2.1 else FAILS,
            note="only in the regime n(1-S) << 1; at n(1-S) ~ 1 the ratio gap/(1-S)^2 already deviates (see data)",
        ),
        Record(
            "P1.mc",
            "[derived] the stratified value L = L~ + sum_{m>=2} P(m) e_m equals a plain Monte-Carlo estimate of "
            "L_SDL (jsdl.sdl_loss on the bench's samples), and the bench's feature_weights() equal "
            "(1-S) S^(n-1) (c_min^2 + 2 c_min beta + 2 beta^2)",
            {**setting, "sparsity": sparsity, "mc_samples": mc_samples},
            {"L_mc": mc, "L_mc_se": mc_se, "L_stratified": L_strat, "z_score": z_mc, "weights_match": weights_ok},
            "|z| <= 4 and weights equal to 1e-5 relative",
            HOLDS if z_mc <= 4 and weights_ok else FAILS,
        ),
    ]
    return recs


@register("P1.default")
def check_default_regime(key, *, n: int = 1000, n_p: int = 768, sparsity: float = 0.99, samples: int = 8192):
    """P1 (second part): at the Bench default (n=1000, S=0.99) L~ is a poor proxy for L."""
    kb, km = jax.random.split(key)
    bench = _bench(kb, n, n_p, 0.1, sparsity)
    problem = _ax.FeatureProblem.from_bench(bench)
    params = theorem_3_3_solution(bench.W_p, bench.W_r)
    Lt = _f(_ax.approx_loss(params, problem))
    spec = _ax.spec_for(problem, n)
    L, se = _ax.mc_loss(km, params, spec, bench, n_samples=samples, batch_size=min(samples, 4096))
    p = 1 - sparsity
    p_one = n * p * (1 - p) ** (n - 1)
    return [
        Record(
            "P1.default",
            "[derived] at the Bench default (n=1000, S=0.99) the experiments run far outside Thm 3.1's regime and "
            "L~ is a poor proxy for L_SDL",
            {"bench": _bench_source(bench), "n": n, "n_p": n_p, "sparsity": sparsity, "params": "Thm 3.3 W*", "samples": samples,
             "realized_interference": max_interference(bench.W_p)},
            {"L_approx": Lt, "L_mc": L, "L_mc_se": se, "ratio_Lapprox_over_L": Lt / L if L > 0 else float("nan"),
             "n(1-S)": n * p, "P(exactly one active)": p_one, "P(>=2 active)": 1 - (1 - p) ** n - p_one},
            "L~/L < 0.01",
            HOLDS if L > 0 and Lt / L < 0.01 else FAILS,
        )
    ]


@register("P2")
def check_decoder_block(key, *, n: int = 8, n_p: int = 6, n_q: int = 10, n_points: int = 4, batch: int = 256):
    """P2: the decoder block is PSD at any encoder and equals its closed form, for L~ and for the
    empirical L_SDL on a batch; the least-squares decoder is its exact minimiser."""
    kb, kp, kx = jax.random.split(key, 3)
    bench = _bench(kb, n, n_p, 0.3, 0.9)
    problem = _ax.FeatureProblem.from_bench(bench)
    spec = _ax.spec_for(problem, n_q)
    xb = bench.sample(kx, batch)
    xb = Batch(xb.x_p, xb.x_p if xb.x_r is None else xb.x_r)

    def mse(p, b):
        return jsdl.sdl_loss(p, b, spec)[0]

    err_cf, err_mc, min_eig, dep_wd, ls_grad, ls_gain = 0.0, 0.0, np.inf, 0.0, 0.0, np.inf
    for i in range(n_points):
        params = random_params(jax.random.fold_in(kp, i), n_q, n_p, n_p)
        H = _hs.full_hessian(_ax.approx_loss, params, problem)
        Z = _ax.codes_per_feature(params, problem)
        A = _hs.decoder_block_closed_form(Z, problem.M)
        HD = np.asarray(H.block("W_D"))
        scale = float(np.abs(HD).max()) + 1e-300
        err_cf = max(err_cf, float(np.abs(HD - 2 * np.kron(np.eye(n_p), A)).max()) / scale)
        min_eig = min(min_eig, float(np.linalg.eigvalsh(HD)[0]) / scale)
        # independence of W_D: same block at another decoder
        p2 = params.replace(W_D=params.W_D + 1.0)
        H2 = _hs.full_hessian(_ax.approx_loss, p2, problem)
        dep_wd = max(dep_wd, float(np.abs(np.asarray(H2.block("W_D")) - HD).max()) / scale)
        # empirical loss on a batch: (2/B) I (x) X_q^T X_q
        Hm = _hs.full_hessian(mse, params, xb)
        codes = jsdl.encode(params, xb.x_p, spec)
        Am = (codes.T @ codes) / batch
        HmD = np.asarray(Hm.block("W_D"))
        sm = float(np.abs(HmD).max()) + 1e-300
        err_mc = max(err_mc, float(np.abs(HmD - 2 * np.kron(np.eye(n_p), Am)).max()) / sm)
        min_eig = min(min_eig, float(np.linalg.eigvalsh(HmD)[0]) / sm)
        # least-squares decoder: zero W_D gradient and no perturbation does better
        pl = _st.least_squares_decoder(params, problem)
        g = jax.grad(_ax.approx_loss)(pl, problem).W_D
        l0 = _f(_ax.approx_loss(pl, problem))
        ls_grad = max(ls_grad, float(jnp.linalg.norm(g)) / max(1.0, l0))
        for j in range(5):
            d = jax.random.normal(jax.random.fold_in(kp, 100 * i + j), pl.W_D.shape, pl.W_D.dtype) * 1e-2
            ls_gain = min(ls_gain, _f(_ax.approx_loss(pl.replace(W_D=pl.W_D + d), problem)) - l0)
    tol = zero_tol()
    ok = err_cf <= tol and err_mc <= tol and min_eig >= -tol and dep_wd <= tol and ls_grad <= tol and ls_gain >= 0
    return [
        Record(
            "P2",
            "Thm 3.2 (decoder block): for fixed W_E the loss is an exact quadratic in W_D with Hessian "
            "2 sum_d M_d (z_d z_d^T) (x) I (PSD), for L~ and for the empirical L_SDL alike; the least-squares decoder "
            "is the exact minimiser",
            {"bench": _bench_source(bench), "n": n, "n_p": n_p, "n_q": n_q, "points": n_points, "batch": batch},
            {"max_rel_err_closed_form_Ltilde": err_cf, "max_rel_err_closed_form_empirical": err_mc,
             "min_eig_over_max_abs": min_eig, "block_change_with_W_D": dep_wd,
             "ls_decoder_grad_norm": ls_grad, "min_loss_change_around_ls_decoder": ls_gain},
            f"errors, |grad| <= {tol:.0e} (relative); min eigenvalue >= -{tol:.0e}; perturbations never lower the loss",
            HOLDS if ok else FAILS,
        )
    ]


@register("P3")
def check_encoder_block(key, *, n: int = 8, n_p: int = 6, n_q: int = 10, n_points: int = 4):
    """P3: encoder block PSD inside a region and equal to its closed form; convex along a segment
    inside the region; the joint Hessian has negative eigenvalues; full Hessian, HVP and finite
    differences agree."""
    kb, kp, kd = jax.random.split(key, 3)
    bench = _bench(kb, n, n_p, 0.3, 0.99)
    problem = _ax.FeatureProblem.from_bench(bench)
    problem = problem.replace(M=problem.M / jnp.max(problem.M))  # unit scale for readable eigenvalues
    err, min_eig, seg_min, joint_min, agree_hvp, agree_fd, joint_where = 0.0, np.inf, np.inf, np.inf, 0.0, 0.0, ""
    for i in range(n_points):
        params = point_with_margin(jax.random.fold_in(kp, i), problem, n_q, n_p, n_p)
        if i % 2 == 1:  # also at a least-squares decoder (a partial optimum in W_D)
            params = _st.least_squares_decoder(params, problem)
        mask = _ax.activation_pattern(params, problem)
        H = _hs.full_hessian(_ax.approx_loss_frozen, params, problem, mask)
        HE = np.asarray(H.block("W_E"))
        CF = np.asarray(_hs.encoder_block_closed_form(params.W_D, problem.W_p, problem.M, mask))
        s = float(np.abs(HE).max()) + 1e-300
        err = max(err, float(np.abs(HE - CF).max()) / s)
        min_eig = min(min_eig, float(np.linalg.eigvalsh(HE)[0]) / s)
        # convexity along a segment inside the region: second differences of the true L~
        d = jax.random.normal(jax.random.fold_in(kd, i), params.W_E.shape, params.W_E.dtype)
        t = 1.0
        while not bool(_ax.in_region(params, params.replace(W_E=t * d, W_D=jnp.zeros_like(params.W_D)), problem)):
            t *= 0.5
        ts = np.linspace(-t, t, 21) if bool(
            _ax.in_region(params, params.replace(W_E=-t * d, W_D=jnp.zeros_like(params.W_D)), problem)) else np.linspace(0, t, 21)
        vals = np.array([_f(_ax.approx_loss(params.replace(W_E=params.W_E + u * d), problem)) for u in ts])
        sd = vals[2:] - 2 * vals[1:-1] + vals[:-2]
        seg_min = min(seg_min, float(sd.min()) / (float(np.abs(vals).max()) + 1e-300))
        ev = H.eigvalsh()
        jm = float(ev[0]) / (float(np.abs(ev).max()) + 1e-300)
        if jm < joint_min:
            joint_min, joint_where = jm, ("least-squares decoder" if i % 2 else "random point") + f" #{i}: lambda_min={ev[0]:.4g}, lambda_max={ev[-1]:.4g}"
        # full Hessian vs HVP vs finite differences
        mv, dim = _hs.make_hvp(_ax.approx_loss_frozen, params, problem, mask)
        v = jax.random.normal(jax.random.fold_in(kd, 100 + i), (dim,), params.W_E.dtype)
        Hv = np.asarray(H.matrix) @ np.asarray(v)
        nrm = float(np.linalg.norm(Hv)) + 1e-300
        agree_hvp = max(agree_hvp, float(np.linalg.norm(np.asarray(mv(v)) - Hv)) / nrm)
        fd = _hs.finite_difference_hvp(_ax.approx_loss_frozen, params, v, problem, mask, eps=1e-4)
        agree_fd = max(agree_fd, float(np.linalg.norm(np.asarray(fd) - Hv)) / nrm)
    tol = zero_tol()
    fd_tol = 1e-6 if tol < 1e-6 else 5e-2
    setting = {"bench": _bench_source(bench), "n": n, "n_p": n_p, "n_q": n_q, "points": n_points,
               "loss": "L~ with the activation mask frozen (stop_gradient), M_d rescaled to max 1"}
    return [
        Record(
            "P3",
            "Thm 3.2 (encoder block): inside a region the loss is a convex quadratic in W_E with Hessian "
            "2 sum_d M_d (W_D,A(d)^T W_D,A(d)) (x) w_p^d w_p^dT (PSD)",
            setting,
            {"max_rel_err_closed_form": err, "min_eig_over_max_abs": min_eig, "min_second_difference_along_segment": seg_min},
            f"error <= {tol:.0e}, min eigenvalue and second differences >= -{tol:.0e} (relative)",
            HOLDS if err <= tol and min_eig >= -tol and seg_min >= -tol else FAILS,
        ),
        Record(
            "P3.joint",
            "[derived] the joint (W_D, W_E) Hessian is not PSD in general: the loss is non-convex even inside one region",
            setting,
            {"most_negative_lambda_min_over_max_abs": joint_min, "where": joint_where},
            "a relative eigenvalue < -1e-6 found",
            HOLDS if joint_min < -1e-6 else FAILS,
        ),
        Record(
            "H1",
            "full Hessian (HVPs over basis vectors), forward-over-reverse HVP and central finite differences of the "
            "gradient agree",
            setting,
            {"max_rel_err_hvp_vs_full": agree_hvp, "max_rel_err_fd_vs_full": agree_fd},
            f"HVP vs full <= {tol:.0e}; finite differences (eps=1e-4) <= {fd_tol:.0e}",
            HOLDS if agree_hvp <= tol and agree_fd <= fd_tol else FAILS,
        ),
    ]


@register("H2")
def check_lanczos(key, *, n: int = 16, n_p: int = 12, n_q: int = 24, batch: int = 512, iters: int = 60):
    """H2: Lanczos extremes (with and without the rescaling symmetry projected out) agree with a
    dense eigensolver on the empirical SAE loss."""
    kb, kp, kx = jax.random.split(key, 3)
    bench = _bench(kb, n, n_p, 0.3, 0.9)
    problem = _ax.FeatureProblem.from_bench(bench)
    spec = _ax.spec_for(problem, n_q)
    params = random_params(kp, n_q, n_p, n_p)
    xb = bench.sample(kx, batch)
    xb = Batch(xb.x_p, xb.x_p if xb.x_r is None else xb.x_r)

    def mse(p, b):
        return jsdl.sdl_loss(p, b, spec)[0]

    H = _hs.full_hessian(mse, params, xb)
    ev = H.eigvalsh()
    Q = _hs.rescaling_tangents(params, tol=1e-12)
    evq = _hs.complement_eigvalsh(H.matrix, Q)
    mv, dim = _hs.make_hvp(mse, params, xb)
    r = _hs.lanczos_extremes(mv, dim, kx, num_iters=iters)
    rq = _hs.lanczos_extremes(mv, dim, kx, num_iters=iters, ortho=Q)
    sc = float(np.abs(ev).max())
    errs = {
        "max": abs(r["max"] - ev[-1]) / sc, "min": abs(r["min"] - ev[0]) / sc,
        "max_projected": abs(rq["max"] - evq[-1]) / sc, "min_projected": abs(rq["min"] - evq[0]) / sc,
    }
    ok = max(errs.values()) <= 1e-6
    return [
        Record(
            "H2",
            "Lanczos (full reorthogonalisation) extreme eigenvalues agree with a dense eigensolver",
            {"bench": _bench_source(bench), "params": dim, "batch": batch, "lanczos_iters": iters, "symmetry_directions": int(Q.shape[0])},
            {"dense_min": ev[0], "dense_max": ev[-1], "lanczos_min": r["min"], "lanczos_max": r["max"],
             "dense_min_projected": evq[0], "lanczos_min_projected": rq["min"], "rel_errors": errs},
            "relative error <= 1e-6 (of max |lambda|)",
            HOLDS if ok else FAILS,
        )
    ]


@register("P4")
def check_theorem_3_3(key, *, n: int = 8, n_p: int = 6, n_q: int = 10):
    """P4: W* of Theorem 3.3: L~ within both bounds, 100% recovery, tied for SAEs, and exactly zero
    when every pairwise overlap is <= 0."""
    kb, kt = jax.random.split(key)
    recs = []
    for method in ("sae", "transcoder"):
        bench = _bench(jax.random.fold_in(kb, method == "sae"), n, n_p, 0.3, 0.99, method)
        problem = _ax.FeatureProblem.from_bench(bench)
        W = theorem_3_3_solution(bench.W_p, bench.W_r, n_q)
        Lt = _f(_ax.approx_loss(W, problem))
        b = theorem_3_3_bounds(problem)
        rec = _recovery(W, bench)
        tied = bool(np.allclose(np.asarray(W.W_D), np.asarray(W.W_E).T)) if method == "sae" else None
        ok = Lt <= b["tight"] * (1 + 1e-9) + 1e-300 and b["tight"] <= b["paper"] and rec["m_gt"] == 1.0 and rec["m_gt_dec"] == 1.0
        ok = ok and (tied is not False)
        recs.append(
            Record(
                f"P4.{method}",
                "Thm 3.3: W_E* = [W_p^T; 0], W_D* = [W_r, 0] has L~ <= n^2 M^2 sum M_d (and the tighter "
                "M^2 sum M_d (K_d-1)^2), recovers every GT feature, and is tied for SAEs",
                {"bench": _bench_source(bench), "method": method, "n": n, "n_p": n_p, "n_q": n_q},
                {"L_approx": Lt, "bound_tight": b["tight"], "bound_paper": b["paper"], "max_interference": b["max_interference"],
                 "K_d": b["K"], "recovery": rec, "tied": tied},
                "L~ <= tight bound <= paper bound; M_GT = 100% on encoder rows and decoder columns",
                HOLDS if ok else FAILS,
            )
        )
    # obtuse features: regular simplex, pairwise overlap -1/(n-1)
    d = 5
    V = np.eye(d + 1) - 1.0 / (d + 1)
    U, _, _ = np.linalg.svd(V)
    W_p = (U[:, :d].T @ V)
    W_p = jnp.asarray(W_p / np.linalg.norm(W_p, axis=0))
    problem = _ax.make_problem(W_p, None, 1.0)
    W = theorem_3_3_solution(W_p, W_p)
    Lt = _f(_ax.approx_loss(W, problem))
    recs.append(
        Record(
            "P4.obtuse",
            "[derived] L~(W*) = 0 exactly when all pairwise overlaps are <= 0",
            {"W_p": f"regular simplex, {d + 1} unit vectors in R^{d}", "overlap": -1.0 / d},
            {"L_approx": Lt},
            f"L~ <= {zero_tol():.0e}",
            HOLDS if Lt <= zero_tol() else FAILS,
        )
    )
    return recs


@register("P5")
def check_non_identifiability(
    key, *, n: int = 8, n_p: int = 6, n_q: int = 12, n_solutions: int = 4, n_per_m: int = 4096, mc_samples: int = 262144
):
    """P5: random-encoder zero-loss solutions W_D = W_r Z^+ (non-identifiable, no recovery), and
    their true loss against the GT-recovering W*."""
    kb, ks, kg, km = jax.random.split(key, 4)
    bench = _bench(kb, n, n_p, 0.3, 0.999)
    problem = _ax.FeatureProblem.from_bench(bench)
    law = _ax.SparseLaw.from_bench(bench)
    Wstar = theorem_3_3_solution(bench.W_p, bench.W_r, n_q)
    sols = [zero_loss_solution(jax.random.fold_in(ks, i), problem, n_q) for i in range(n_solutions)]
    losses = [_f(_ax.approx_loss(p, problem)) for p in sols]
    recs_ = [_recovery(p, bench) for p in sols]
    dist = min(float(jnp.linalg.norm(a.W_D - b.W_D)) for a, b in itertools.combinations(sols, 2))
    scale = float(jnp.sum(problem.M))
    ok1 = max(losses) <= zero_tol() * scale and min(r["m_gt"] for r in recs_) == 0.0 and dist > 1e-3
    one_minus = np.logspace(-5, -1, 17)
    S = 1 - one_minus
    g_star = _ax.multi_feature_gap(kg, Wstar, problem, law, S, n_per_m=n_per_m, m_max=n)
    g_rand = [_ax.multi_feature_gap(kg, p, problem, law, S, n_per_m=n_per_m, m_max=n) for p in sols]
    L_star = g_star["mean_loss"]
    L_rand = np.stack([g["mean_loss"] for g in g_rand])
    se = np.sqrt(g_star["gap_se"] ** 2 + np.stack([g["gap_se"] for g in g_rand]) ** 2)
    better = L_rand < L_star - 3 * se  # [solutions, S]
    regime = one_minus <= 1.0 / n
    frac_better = better.mean(0)
    # crossover: smallest 1-S where some random solution stops being better
    S_any = one_minus[better.any(0)]
    spec = _ax.spec_for(problem, n_q)
    bs = min(mc_samples, 32768)
    mc_star = _ax.mc_loss(km, Wstar, spec, bench, n_samples=mc_samples, batch_size=bs)
    mc_rand = [_ax.mc_loss(km, p, spec, bench, n_samples=mc_samples, batch_size=bs) for p in sols]
    setting = {"bench": _bench_source(bench), "n": n, "n_p": n_p, "n_q": n_q, "solutions": n_solutions,
               "encoder": "i.i.d. Gaussian, ReLU", "bench_sparsity": float(bench.sparsity)}
    return [
        Record(
            "P5",
            "Thm 3.4 / non-identifiability: random encoders with rank-n code matrix Z and W_D = W_r Z^+ give L~ = 0; "
            "distinct such solutions exist, and some recover no GT feature",
            setting,
            {"max_L_approx": max(losses), "sum_M_d": scale, "m_gt_encoder": [r["m_gt"] for r in recs_],
             "m_ip_encoder": [r["m_ip"] for r in recs_], "m_gt_decoder": [r["m_gt_dec"] for r in recs_],
             "min_pairwise_decoder_distance": dist, "L_approx_W*": _f(_ax.approx_loss(Wstar, problem))},
            f"L~ <= {zero_tol():.0e} * sum M_d for all; M_GT = 0 for at least one; solutions at distance > 1e-3",
            HOLDS if ok1 else FAILS,
        ),
        Record(
            "P5.true_loss",
            "[derived] with non-zero interference, non-recovering zero-loss solutions can have a lower true loss "
            "L_SDL than the GT-recovering W*",
            setting,
            {"one_minus_S": one_minus, "L_W*": L_star, "L_random_mean": L_rand.mean(0),
             "fraction_of_random_solutions_better": frac_better,
             "largest_1-S_where_some_random_is_better": float(S_any.max()) if S_any.size else None,
             "mc_at_bench_S": {"W*": mc_star, "random": mc_rand}},
            "some random solution lower by > 3 standard errors (stratified estimator) at every 1-S <= 1/n",
            HOLDS if better[:, regime].any(0).all() else FAILS,
            note="as 1-S -> 0, L -> L~ and L~(random) = 0 < L~(W*) (interference), so some non-recovering solution is "
                 "always better close enough to S = 1; further from it the multi-feature error decides (see fractions)",
            data={"one_minus_S": one_minus, "L_star": L_star, "L_rand": L_rand},
        ),
    ]


@register("P6")
def check_example_3_5(key=None):
    """P6: Example 3.5: loss 1, zero gradients, degenerate PSD Hessian."""
    params, problem = example_3_5()
    L = _f(_ax.approx_loss(params, problem))
    g = jax.grad(_ax.approx_loss)(params, problem)
    mask = _ax.activation_pattern(params, problem)
    cls = _st.classify(_ax.approx_loss_frozen, params, problem, mask)
    raw = _hs.full_hessian(_ax.approx_loss_frozen, params, problem, mask).eigvalsh()
    # small random perturbations stay in the region (Top-1 makes it a neighbourhood)
    inside = all(
        bool(_ax.in_region(params, jax.tree.map(lambda a, k=k: 1e-3 * jax.random.normal(k, a.shape, a.dtype), params), problem))
        for k in jax.random.split(jax.random.PRNGKey(0), 8)
    )
    gE, gD = float(jnp.linalg.norm(g.W_E)), float(jnp.linalg.norm(g.W_D))
    tol = zero_tol()
    return [
        Record(
            "P6",
            "Example 3.5: W_E* = [[1,1],[0,0]], W_D* = [[1/2,0],[1/2,0]] with Top-1 o ReLU, W_p = W_r = I, M_d = 1 has "
            "loss 1 and zero gradients (a partial optimum with positive loss)",
            {"activation": "relu|topk k=1", "n": 2, "M_d": [1.0, 1.0]},
            {"L_approx": L, "grad_norm_W_E": gE, "grad_norm_W_D": gD, "hessian_eigenvalues": raw,
             "eigenvalues_symmetry_projected": cls["eigenvalues"], "classification": cls["kind"],
             "small_perturbations_stay_in_region": inside},
            f"|L - 1| <= {tol:.0e}, gradient norms <= {tol:.0e}",
            HOLDS if abs(L - 1) <= tol and gE <= tol and gD <= tol else FAILS,
            note="[derived] the Hessian is PSD with zero eigenvalues (degenerate, not a strict saddle): escaping needs "
                 "a discrete change of region",
        )
    ]


def _theorem_3_6_literal(dtype, tol):
    """P7.literal: the proof's construction (eq. 55) on (a) orthonormal features with unequal M_d and
    (b) equal M_d with w_r at 60 degrees. Returns ``(record, problem of case a, stationary?)``."""
    # (a) orthonormal features, unequal M_d
    prob = _ax.make_problem(jnp.eye(3, dtype=dtype), None, jnp.array([1.0, 2.0, 1.5], dtype))
    sets = [[0, 1], [2]]
    p = theorem_3_6_literal(prob, sets, n_q=3)
    mask = _ax.activation_pattern(p, prob)
    summ = _ax.pattern_summary(mask)
    g = jax.grad(_ax.approx_loss_frozen)(p, prob, mask)
    gE_a, gD_a = float(jnp.linalg.norm(g.W_E)), float(jnp.linalg.norm(g.W_D))
    # (b) equal M_d, non-orthogonal w_r (60 degrees), unequal encoder values
    W2 = jnp.array([[1.0, 0.5], [0.0, math.sqrt(0.75)]], dtype)
    prob_b = _ax.make_problem(W2, None, 1.0)
    pb = theorem_3_6_literal(prob_b, [[0, 1]], values=[1.0, 2.0], n_q=2)
    mb = _ax.activation_pattern(pb, prob_b)
    gb = jax.grad(_ax.approx_loss_frozen)(pb, prob_b, mb)
    gE_b, gD_b = float(jnp.linalg.norm(gb.W_E)), float(jnp.linalg.norm(gb.W_D))
    rec = Record(
        "P7.literal",
        "Thm 3.6 proof: a realising encoder with the per-neuron weighted least-squares decoder (eq. 55) is a "
        "partial minimum (both gradients vanish)",
        {"case_a": "W_p = W_r = I_3, M = (1, 2, 1.5), pattern F = ({0,1}, {2}, {}) (polysemantic partition, 1 dead)",
         "case_b": "w_r at 60 degrees, M = (1, 1), encoder values (1, 2) on the polysemantic neuron"},
        {"case_a": {"grad_W_D": gD_a, "grad_W_E": gE_a, "pattern": summ["sets"], "is_partition": summ["is_partition"]},
         "case_b": {"grad_W_D": gD_b, "grad_W_E": gE_b}},
        f"gradient norms <= {tol:.0e}",
        FAILS if (gE_a > tol or gE_b > tol) else HOLDS,
        note="the decoder gradient vanishes (eq. 55 is the decoder's normal equation) but the encoder gradient does "
             "not: the normal equation gives sum_d M_d z_d r_d = 0, not sum_d M_d (w_D^T r_d) w_p^d = 0",
    )
    return rec, prob, not (gE_a > tol or gE_b > tol)


def _theorem_3_6_corrected(dtype, tol):
    """P7.corrected: the top-eigenvector characterisation on two features at 50 degrees plus one
    orthogonal. Returns ``(record, problem, partial optimum, its info, holds?)``."""
    # (c) corrected characterisation: top eigenvector of G_i, non-orthogonal w_r with positive overlap
    th = math.radians(50)
    W3 = jnp.array([[1.0, math.cos(th), 0.0], [0.0, math.sin(th), 0.0], [0.0, 0.0, 1.0]], dtype)
    prob_c = _ax.make_problem(W3, None, jnp.array([1.0, 2.5, 1.0], dtype))
    pc, info = eigen_partial_optimum(prob_c, [[0, 1], [2]], n_q=3)
    mc_ = _ax.activation_pattern(pc, prob_c)
    gc = jax.grad(_ax.approx_loss_frozen)(pc, prob_c, mc_)
    Lc = _f(_ax.approx_loss(pc, prob_c))
    region_ok = _ax.pattern_summary(mc_)["sets"][:2] == [[0, 1], [2]]
    cls = _st.classify(_ax.approx_loss_frozen, pc, prob_c, mc_)
    _, info2 = eigen_partial_optimum(prob_c, [[0, 1], [2]], which="second", n_q=3)
    second_inside = bool(np.all(info2["sets"][0]["z"] > 0))
    gnorm_c = float(jnp.sqrt(jnp.sum(gc.W_E**2) + jnp.sum(gc.W_D**2)))
    ok_c = gnorm_c <= tol and abs(Lc - info["predicted_loss"]) <= tol and region_ok and Lc > 0
    rec = Record(
        "P7.corrected",
        "[derived] interior partial optima of a partition pattern: each polysemantic decoder column is an "
        "eigenvector u of G_i = sum_{d in F_i} M_d w_r^d w_r^dT, z_d = <u, w_r^d>/||u||^2 > 0, neuron loss "
        "sum M_d ||w_r^d||^2 - lambda",
        {"w_r": "two features at 50 degrees + one orthogonal, M = (1, 2.5, 1)", "pattern": "({0,1}, {2}, {})"},
        {"grad_norm": gnorm_c, "L_approx": Lc, "predicted": info["predicted_loss"], "z_top": info["sets"][0]["z"],
         "second_eigenvector_z": info2["sets"][0]["z"], "second_eigenvector_inside_region": second_inside,
         "classification": cls["kind"], "hessian_lambda_min": cls["lambda_min"], "n_zero_eigs": cls["n_zero"]},
        f"gradient norm and |L~ - predicted| <= {tol:.0e}; pattern preserved; L~ > 0",
        HOLDS if ok_c else FAILS,
    )
    return rec, prob_c, pc, info, ok_c


def _theorem_3_6_acs(key, dtype, prob, prob_c, pc, info):
    """P7.acs: alternating convex search from polysemantic starts on the problems of the two records
    above."""
    # (d) ACS from a polysemantic start: converges to the top eigenvector (positive overlaps) or drifts to the
    # boundary (orthonormal, distinct M_d)
    k1, k2 = jax.random.split(key)
    start = _ax.theory_params(
        jnp.array([[0.8, 0.5, -1.0], [0.0, 0.0, 1.0], [-0.3, -0.3, -0.3]], dtype),
        jax.random.normal(k1, (3, 3), dtype) * 0.3 + jnp.eye(3, dtype=dtype),
    )
    pat0 = _ax.pattern_summary(_ax.activation_pattern(start, prob_c))["sets"]
    out, hist = _st.alternating_convex_search(start, prob_c, iters=300)
    u_top = np.asarray(pc.W_D[:, 0])
    cosine = abs(float(np.asarray(out.W_D[:, 0]) @ u_top / (np.linalg.norm(np.asarray(out.W_D[:, 0])) + 1e-300)))
    start_o = _ax.theory_params(
        jnp.array([[1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [-0.3, -0.3, -0.3]], dtype),
        jax.random.normal(k2, (3, 3), dtype) * 0.3 + jnp.eye(3, dtype=dtype),
    )
    out_o, hist_o = _st.alternating_convex_search(start_o, prob, iters=300)
    z_o = np.asarray(_ax.codes_per_feature(out_o, prob))
    light_act = float(z_o[0, 0])  # the lighter feature (M=1) on the polysemantic neuron
    Lo = hist_o["final_loss"]
    expect_o = 1.0  # boundary value: the lighter feature is dropped: M_0 ||w_r^0||^2
    ok_d = cosine >= 1 - 1e-6 and abs(hist["final_loss"] - info["predicted_loss"]) <= 1e-6 and light_act < 1e-2 and abs(Lo - expect_o) < 1e-2
    rec = Record(
        "P7.acs",
        "[derived] alternating convex search from a polysemantic start converges to the top-eigenvector solution "
        "(positive overlaps), or drifts to the region boundary where the lighter feature stops firing "
        "(orthonormal w_r, distinct M_d)",
        {"start_pattern": pat0, "iters": 300},
        {"cos_to_top_eigenvector": cosine, "loss": hist["final_loss"], "predicted": info["predicted_loss"],
         "rounds": int(hist["loss"].size),
         "orthonormal_case": {"light_feature_activation": light_act, "loss": Lo, "boundary_loss": expect_o,
                              "rounds": int(hist_o["loss"].size)}},
        "cosine >= 1 - 1e-6 and |loss - predicted| <= 1e-6; orthonormal case: light activation < 1e-2, "
        "loss within 1e-2 of the boundary value",
        HOLDS if ok_d else FAILS,
        data={"acs_loss": hist["loss"], "acs_loss_orthonormal": hist_o["loss"]},
    )
    return rec


@register("P7")
def check_theorem_3_6(key):
    """P7: the literal proof construction of Thm 3.6 (fails with unequal M_d and with non-orthogonal
    w_r), the corrected eigenvector characterisation (holds), and ACS converging to it."""
    dtype = jnp.zeros(()).dtype
    tol = zero_tol()
    rec_lit, prob, literal_ok = _theorem_3_6_literal(dtype, tol)
    rec_cor, prob_c, pc, info, ok_c = _theorem_3_6_corrected(dtype, tol)
    rec_acs = _theorem_3_6_acs(key, dtype, prob, prob_c, pc, info)
    rec = Record(
        "P7.theorem",
        "Thm 3.6: every realizable polysemantic partition pattern has a partial minimum with positive loss",
        {"from": "P7.literal, P7.corrected, P7.acs"},
        {"literal_construction_stationary": literal_ok, "eigen_construction_stationary": ok_c,
         "orthonormal_distinct_M_interior_optimum": False},
        "see the component records",
        CONDITIONAL,
        condition="the top eigenvector u of G_i has <u, w_r^d> > 0 for all d in F_i (e.g. equal M_d, or positively "
                  "overlapping w_r) and the codes z_d = <u, w_r^d>/||u||^2 are realisable; with orthonormal w_r and "
                  "distinct M_d no interior partial optimum of that pattern exists",
    )
    return [rec_lit, rec_cor, rec_acs, rec]


def _dead_latents_pigeonhole():
    """P8.pigeonhole: enumerate every polysemantic partition of 4 features over 4 or 5 latents."""
    worst = None
    count = 0
    for nq in (4, 5):
        for assign in itertools.product(range(nq), repeat=4):
            P = np.zeros((nq, 4), bool)
            P[list(assign), range(4)] = True
            s = _ax.pattern_summary(P)
            if s["is_polysemantic"] and s["is_partition"]:
                count += 1
                worst = s["n_dead"] if worst is None else min(worst, s["n_dead"])
    return Record(
        "P8.pigeonhole",
        "[derived] every polysemantic partition pattern with n_q >= n has at least one dead latent",
        {"n": 4, "n_q": [4, 5], "enumeration": "all assignments"},
        {"patterns_checked": count, "min_dead": worst},
        "min_dead >= 1",
        HOLDS if worst is not None and worst >= 1 else FAILS,
    )


def _dead_latents_gradient(key, n, n_p, batch):
    """P8.gradient: a dead Top-1 latent under pure MSE and under AuxK."""
    # (b) a dead Top-1 latent: pre-activation positive but never selected
    kb, kx = jax.random.split(key)
    bench = _bench(kb, n, n_p, 0.3, 0.9)
    n_q = n + 1
    W = theorem_3_3_solution(bench.W_p, bench.W_r, n_q)
    W = W.replace(W_E=W.W_E.at[n].set(0.5 * bench.W_p[:, 0]), W_D=W.W_D.at[:, n].set(bench.W_r[:, 1]))
    xb = bench.sample(kx, batch)
    xb = Batch(xb.x_p, xb.x_p if xb.x_r is None else xb.x_r)
    spec = jsdl.make_spec("sae", "topk", n_q, bias=False, k=1)
    spec_aux = jsdl.make_spec("sae", "topk", n_q, bias=False, k=1, aux_k=1, aux_coef=1.0)
    dead = jnp.zeros((n_q,), bool).at[n].set(True)
    codes = jsdl.encode(W, xb.x_p, spec)
    fired = float(jnp.max(jnp.abs(codes[:, n])))
    pre_pos = float(jnp.mean(xb.x_p @ W.W_E[n] > 0))
    g = jax.grad(lambda p: jsdl.sdl_loss(p, xb, spec)[0])(W)
    ga = jax.grad(lambda p: jsdl.sdl_loss(p, xb, spec_aux, dead_mask=dead)[0])(W)
    g0 = float(jnp.linalg.norm(g.W_E[n]) + jnp.linalg.norm(g.W_D[:, n]))
    gaux_E, gaux_D = float(jnp.linalg.norm(ga.W_E[n])), float(jnp.linalg.norm(ga.W_D[:, n]))
    return Record(
        "P8.gradient",
        "[derived] dead latents get exactly zero gradient in their W_E row and W_D column under pure MSE, but not "
        "under Gao's AuxK loss",
        {"bench": _bench_source(bench), "activation": "topk k=1", "dead_latent": "0.5 w_p^0 (positive pre-activation, never "
         "selected)", "batch": batch, "aux": "aux_k=1, aux_coef=1"},
        {"max_code_of_dead_latent": fired, "fraction_positive_preactivation": pre_pos, "grad_norm_mse": g0,
         "grad_norm_auxk_W_E_row": gaux_E, "grad_norm_auxk_W_D_col": gaux_D},
        "MSE gradient exactly 0; AuxK gradient > 1e-6",
        HOLDS if g0 == 0.0 and fired == 0.0 and (gaux_E > 1e-6 or gaux_D > 1e-6) else FAILS,
        note="with ReLU dead latents whose pre-activations are all negative, AuxK (ReLU of pre-activations) gives "
             "zero gradient too",
    )


def _dead_latents_resampling():
    """P8.resampling: resample the dead latent of Example 3.5's partial optimum, then ACS."""
    # (c) resampling at Example 3.5's partial optimum
    params, problem = example_3_5()
    L0 = _f(_ax.approx_loss(params, problem))
    Z = _ax.codes_per_feature(params, problem)
    per = np.asarray(jnp.sum((problem.W_r - params.W_D @ Z) ** 2, 0) * problem.M)
    d = int(np.argmax(per))
    # re-initialise the dead latent toward the worst-reconstructed feature (Bricken et al. 2023), with a
    # larger activation than the polysemantic latent so Top-1 selects it
    res = params.replace(W_E=params.W_E.at[1].set(1.5 * problem.W_p[:, d]), W_D=params.W_D.at[:, 1].set(0.0))
    L_res = _f(_ax.approx_loss(res, problem))
    out, hist = _st.alternating_convex_search(res, problem, iters=50)
    L1 = hist["final_loss"]
    return Record(
        "P8.resampling",
        "resampling a dead latent changes the activation region and the loss then drops below the plateau of the "
        "polysemantic partial optimum",
        {"start": "Example 3.5 (loss 1, latent 2 dead)", "resample": "w_E^2 = 1.5 w_p^d for the worst-reconstructed d, "
         "w_D^2 = 0, then alternating convex search"},
        {"plateau_loss": L0, "loss_right_after_resampling": L_res, "loss_after_acs": L1,
         "pattern_after": _ax.pattern_summary(_ax.activation_pattern(out, problem))["sets"]},
        "loss after < plateau - 0.1",
        HOLDS if L1 < L0 - 0.1 else FAILS,
        note="checks the mechanism on the toy; the paper's evidence (Fig. 7, Llama 3.1 8B) is not reproduced here",
    )


@register("P8")
def check_dead_latents(key, *, n: int = 8, n_p: int = 6, batch: int = 1024):
    """P8: pigeonhole (polysemantic partitions with n_q >= n have a dead latent), zero gradients of
    dead latents under pure MSE but not under AuxK, and escape by resampling."""
    return [_dead_latents_pigeonhole(), _dead_latents_gradient(key, n, n_p, batch), _dead_latents_resampling()]


@register("P9")
def check_theorem_3_8(key=None):
    """P9: the absorption construction of Theorem 3.8, with per-latent and with global thresholds,
    followed by the eigen construction of a partial optimum in the absorbed pattern."""
    dtype = jnp.zeros(()).dtype
    n = 5
    W_p = jnp.eye(n, dtype=dtype)
    W_p = W_p.at[:, 4].set(jnp.array([0.2, 0.0, 0.0, 0.0, 1.0], dtype))
    W_p = W_p / jnp.linalg.norm(W_p, axis=0)
    c = 0.1
    # parent latent 0 fires for children {0,1,2} with a = (0.5, 0.3, 0.8); latent 1 fires for {3, 4} with 0.9 and
    # 0.15 (just above c); latent 2 is spare (dead)
    rows = [
        realizing_row(W_p, [0.5, 0.3, 0.8, -1.0, -1.0]),
        realizing_row(W_p, [-1.0, -1.0, -1.0, 0.9, 0.15]),
        jnp.zeros((n,), dtype) - 1.0,
    ]
    W_E = jnp.stack(rows)
    th = jnp.full((3,), c, dtype)
    problem = _ax.make_problem(W_p, None, 1.0, "jumprelu", threshold=c)

    def pattern(WE, t):
        return _ax.pattern_summary(_ax.activation_pattern(_ax.theory_params(WE, jnp.zeros((n, 3), dtype), t), problem))["sets"]

    before = pattern(W_E, th)
    WE1, th1, j_star = theorem_3_8_absorption(W_E, th, W_p, parent=0, spare=2, per_neuron=True)
    WE2, th2, _ = theorem_3_8_absorption(W_E, th, W_p, parent=0, spare=2, per_neuron=False)
    expected = [sorted(set(before[0]) - {j_star}), before[1], [j_star]]
    after_per, after_glob = pattern(WE1, th1), pattern(WE2, th2)
    ok_per, ok_glob = after_per == expected, after_glob == expected
    # (b) a partial optimum with positive loss in the absorbed pattern: eigen construction with per-latent
    # thresholds (equal M_d, so G_i's top eigenvector has positive overlaps)
    sets = [s for s in expected if s]
    pe, info = eigen_partial_optimum(problem, sets, n_q=3)
    # raise no threshold above the codes: use thresholds below the smallest code of each latent
    zmin = [float(np.min(s["z"])) for s in info["sets"]]
    th_e = jnp.asarray([min(c, 0.5 * z) for z in zmin], dtype)
    pe = pe.replace(threshold=th_e)
    me = _ax.activation_pattern(pe, problem)
    ge = jax.grad(_ax.approx_loss_frozen)(pe, problem, me)
    gnorm = float(jnp.sqrt(jnp.sum(ge.W_E**2) + jnp.sum(ge.W_D**2)))
    Le = _f(_ax.approx_loss(pe, problem))
    in_pattern = _ax.pattern_summary(me)["sets"] == sets
    tol = zero_tol()
    return [
        Record(
            "P9",
            "Thm 3.8: from a realizable pattern with a multi-feature latent, scaling the parent row by "
            "(c + a_min)/(2 a_min), raising the threshold to c'' and adding alpha w_p^{j*} (alpha = 2c''/(1+M)) "
            "realizes the absorbed pattern P'",
            {"W_p": "5 features, max interference 0.196", "threshold c": c,
             "pattern": before, "other latent": "fires for feature 4 at 0.15, between c and c''"},
            {"j_star": j_star, "expected": expected, "per_latent_thresholds": after_per, "global_threshold": after_glob,
             "c''": float(th1[0])},
            "pattern equal to P'",
            CONDITIONAL if ok_per and not ok_glob else (HOLDS if ok_per and ok_glob else FAILS),
            condition="thresholds are per latent (JumpReLU theta_i), or every other latent's activations exceed c''; "
                      "a spare latent and M < 1 are needed. With the proof's global threshold the other latent loses "
                      "feature 4",
        ),
        Record(
            "P9.partial_optimum",
            "absorbed patterns carry partial optima with positive loss (Thm 3.8 + the corrected Thm 3.6 construction)",
            {"pattern": sets, "M_d": 1.0, "activation": "jumprelu, per-latent thresholds below the codes"},
            {"grad_norm": gnorm, "L_approx": Le, "predicted": info["predicted_loss"], "pattern_preserved": in_pattern},
            f"gradient norm <= {tol:.0e}, L~ > 0 and equal to the prediction",
            HOLDS if gnorm <= tol and Le > tol and abs(Le - info["predicted_loss"]) <= tol and in_pattern else FAILS,
            condition="",
        ),
    ]


@register("P10-13")
def check_training_claims(key, *, quick: bool = True):
    """P10-P13: training-scale results; deferred (see the records' notes)."""
    why = ("training-scale claim (n_q = 16000, n = 1000, 100k samples in the paper); checked by the experiments "
           "(experiments/), not by the laptop-size theory check")
    return [
        Record("P10", "ReLU/JumpReLU SAEs have M_IP near the random baseline; Top-k families reach M_IP ~ 0.98, "
               "M_GT ~ 84-85% at the defaults", {}, {}, "", DEFERRED, note=why),
        Record("P11", "feature anchoring raises M_GT / M_IP on non-anchored features (+1.3 to +4.6 pp)", {}, {}, "",
               DEFERRED, note=why),
        Record("P12", "M_GT with anchoring falls steeply with n/n_p (100 -> 8.6% for ratios 1.04-1.82)", {}, {}, "",
               DEFERRED, note=why),
        Record("P13", "M_GT falls as Top-k's k grows (100% at k=32, 86.7% at 128)", {}, {}, "", DEFERRED, note=why),
    ]


@register("P14")
def check_activation_property(key):
    """P14: sigma(z)_i in {0, z_i} for every registered activation (and compositions); the author
    repo's 'JumpReLU' ReLU(z) + beta 1[z > gamma] violates it. Also records positive homogeneity,
    which Thm 3.1's m = 1 term needs."""
    z = jax.random.normal(key, (64, 32)) * 2
    th = jnp.abs(jax.random.normal(jax.random.fold_in(key, 1), (32,))) * 0.5
    p = SDLParams(W_E=jnp.zeros((32, 1)), threshold=th)
    names = _act.names() + ["relu|topk"]
    prop, homog = {}, {}
    for nm in names:
        hyper = {"k": 4} if "k" in _act.hyper_names(nm) else {}
        sig = _act.get(nm, **hyper)
        out = np.asarray(sig(z, p))
        zz = np.asarray(z)
        prop[nm] = bool(np.all((out == 0) | (out == zz)))
        homog[nm] = bool(np.allclose(np.asarray(sig(2.5 * z, p)), 2.5 * out)) and bool(
            np.allclose(np.asarray(sig(0.3 * z, p)), 0.3 * out))

    def author_jumprelu(x, beta=0.1, gamma=0.5):
        return jax.nn.relu(x) + beta * (x > gamma)

    out = np.asarray(author_jumprelu(z))
    author_ok = bool(np.all((out == 0) | (out == np.asarray(z))))
    return [
        Record(
            "P14",
            "every activation satisfies sigma(z)_i in {0, z_i} (eq. 10); the author repo's 'JumpReLU' "
            "ReLU(z) + beta 1[z > gamma] does not",
            {"activations": names, "z": "64 x 32 Gaussian", "jumprelu thresholds": "random per latent"},
            {"property": prop, "author_jumprelu_property": author_ok, "positively_homogeneous": homog},
            "exact equality",
            HOLDS if all(prop.values()) and not author_ok else FAILS,
            note="JumpReLU (and batchtopk with an inference threshold) are not positively homogeneous: the m = 1 term "
                 "of Thm 3.1 equals L~ only for homogeneous activations (ReLU, Top-k)",
        )
    ]
register("E1", __import__("jsdl.landscape.readout", fromlist=["_"]).check_encoder_readout)  # jsdl extension beyond P14
