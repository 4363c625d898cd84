"""Writing the penalty-lab report: ``report.json`` (everything), ``report.md`` (what a researcher
reads) and PNG plots (frontier, recovery, shrinkage, ground-truth curvature, pathologies)."""
from __future__ import annotations

import math
import os

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from jsdl.lab.checks import Check, PenaltyChecks
from jsdl.metrics import TAUS
from jsdl.records import dump_json

__all__ = ["write_report"]

COLORS = {"l1": "tab:blue", "weighted_l1": "tab:orange", "topk": "tab:green"}


def _f(v, fmt=".3g"):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "n/a" if not math.isfinite(v) else format(v, fmt)


def _label(name, p):
    return f"k={p['k']}" if "k" in p else f"{p['coef']:.3g}"


def write_report(report: dict, out_dir: str) -> dict:
    """Write ``report.json``, ``report.md`` and the plots into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    plots = _plots(report, out_dir)
    report["plots"] = plots
    jpath = os.path.join(out_dir, "report.json")
    dump_json(report, jpath)
    mpath = os.path.join(out_dir, "report.md")
    with open(mpath, "w") as f:
        f.write(_markdown(report))
    return {"md": mpath, "json": jpath, "plots": [os.path.join(out_dir, p) for p in plots]}


# ------------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------------


def _md_header(r: dict) -> list:
    """Title, setting and findings."""
    name = r["penalty"]
    sc = r["scale"]
    L = [f"# Penalty lab: `{name}`" + (f" {r['hyper']}" if r.get("hyper") else ""), ""]
    L.append(f"Scale `{r['scale_name']}`: Linear Representation Bench with n = {sc['n']} features in d = {sc['d']} "
             f"dimensions, sparsity S = {sc['S']}, max interference M = {sc['M']} (realised "
             f"{_f(r['bench'].get('realized_interference'))}; {r['bench']['source']}); n_q = n latents; "
             f"{sc['steps']} steps of batch {sc['batch']} at lr {sc['lr']}; {r['seeds']} seed(s). "
             f"Coefficients ({r.get('coefs_source', '')}): {', '.join(_f(c) for c in r.get('coefs', []))}. "
             f"Decoder norms for `{name}`: `{r.get('decoder_norm')}`. Total time {_f(r['timings'].get('total'), '.0f')} s.")
    L.append("")
    L.append("## Findings")
    L.append("")
    L.extend(_findings(r))
    L.append("")
    return L


def _md_checks(r: dict) -> list:
    """Section 6: the mechanical checks."""
    L = []
    L.append("## 6. Mechanical checks")
    L.append("")
    pc = PenaltyChecks(r["penalty"], r["hyper"], r["checks"]["straight_through"],
                       [Check(c["name"], c["ok"], c["message"], c["fatal"]) for c in r["checks"]["checks"]])
    L.append(pc.to_markdown())
    L.append("")
    if not r["checks"]["can_train"]:
        L.append("**A fatal check failed: the penalty cannot be trained, so the frontier, recovery and landscape "
                 "sections were skipped.** Fix the failure above and run the lab again.")
        L.append("")
    return L


def _md_frontier(r: dict) -> list:
    """Sections 1-2 (and 4): frontier, recovery, shrinkage."""
    L = []
    fr = r.get("frontier")
    if fr:
        L.append("## 1-2. Sparsity-fidelity frontier and recovery")
        L.append("")
        L.append("One population per penalty (vmapped, coefficients traced), same data stream and seeds; TopK at the "
                 "L0 the penalty reached. M_GT at tau = 0.95 on encoder rows (decoder columns in brackets), M_IP the "
                 "mean best cosine of encoder rows, MCC the matched code-feature correlation; shrinkage: "
                 "jsdl.metrics.shrinkage's mean ratio (matched-latent median slope in brackets; 1 = none).")
        L.append("")
        L.extend(_run_table(fr))
        L.append("")
        L.append("![frontier](frontier.png) ![recovery](recovery.png)")
        L.append("")
        if "shrinkage.png" in r.get("plots", []):
            L.append("## 4. Shrinkage")
            L.append("")
            L.append("![shrinkage](shrinkage.png)")
            L.append("")
    return L


def _md_critical(r: dict) -> list:
    """Section 3: ground truth as a critical point."""
    L = []
    crit = r.get("critical")
    if crit:
        L.append("## 3. Ground truth as a critical point")
        L.append("")
        L.append("Theorem 3.3's W* (W_E = W_p^T, W_D = W_r, biases 0) at the gain g that minimises the objective "
                 "(1-D search; the gain multiplies the encoder with unit-norm decoders, the decoder otherwise). "
                 "Gradient: Riemannian with unit-norm decoders. Hessian: smallest Ritz values of Lanczos on HVPs with "
                 "the sphere normals (unit) or the rescaling tangents (free norms) deflated. `bench`: the lab's bench, "
                 "where interference already makes W* only approximately stationary for the reconstruction term "
                 "(the lambda = 0 row is that floor); `twin`: the same feature law on orthonormal directions, where W* "
                 "is an exact minimiser of the reconstruction term, so any gradient is the penalty's. Verdict: "
                 f"`not stationary` when the gradient norm exceeds {crit.get('twin', crit.get('bench', {})).get('settings', {}).get('floor_factor', 1.5)}x "
                 "the lambda = 0 floor (twin: plus 1e-6 of the gradient scale).")
        L.append("")
        for label in ("bench", "twin"):
            c = crit.get(label, {})
            if "error" in c:
                L.append(f"- {label}: analysis failed: {c['error']}")
                continue
            if "points" not in c:
                continue
            L.append(f"**{label}**")
            L.append("")
            L.append("| lambda | gain | loss | grad norm | / floor | smallest Hessian eigenvalues | largest | verdict |")
            L.append("|---|---|---|---|---|---|---|---|")
            for p in [dict(c["floor"], grad_ratio=1.0, verdict="(reference)")] + c["points"]:
                h = p.get("hessian", {})
                sm = ", ".join(_f(v, ".3g") for v in h.get("smallest", [])) if "smallest" in h else h.get("error", "n/a")
                L.append(f"| {_f(p['coef'])} | {_f(p['gain'], '.4f')} | {_f(p['loss'], '.4g')} | {_f(p['grad_norm'], '.3g')} "
                         f"| {_f(p.get('grad_ratio'), '.3g')} | {sm} | {_f(h.get('max'))} | {p['verdict']} |")
            L.append("")
        if "critical.png" in r.get("plots", []):
            L.append("![critical](critical.png)")
            L.append("")
    return L


def _md_retrain(r: dict) -> list:
    """Training started at W*."""
    L = []
    rt = r.get("retrain")
    if rt:
        L.append("### Training started at W*")
        L.append("")
        if "error" in rt:
            L.append(f"failed: {rt['error']}")
        else:
            L.append(f"{rt['steps']} steps from W* at each coefficient's best gain (lambda = 0: interference alone). "
                     "Moved = Frobenius distance from the start over ||W_p|| (encoder) or ||W_r|| (decoder); cos = mean cosine "
                     "of latent i with feature i.")
            L.append("")
            L.append("| lambda | moved (enc) | moved (dec) | cos enc | cos dec | L0 | FVU | M_GT | shrinkage |")
            L.append("|---|---|---|---|---|---|---|---|---|")
            for p in rt["points"]:
                L.append(f"| {_f(p['coef'])} | {_f(p['rel_dist_W_E'])} | {_f(p['rel_dist_W_D'])} | {_f(p['cos_encoder'])} "
                         f"| {_f(p['cos_decoder'])} | {_f(p['l0'])} | {_f(p['fvu'])} | {_f(p['m_gt'])} | {_f(p['shrinkage'])} |")
        L.append("")
    return L


def _md_hierarchy(r: dict) -> list:
    """Section 5: pathologies on the hierarchical bench."""
    L = []
    hi = r.get("hierarchy")
    if hi:
        L.append("## 5. Pathologies (hierarchical bench)")
        L.append("")
        L.append("Dead fraction: latents that never fire on the evaluation sample. Absorption: how often a parent's "
                 "latent is silent while parent and child are both active (jsdl.metrics.absorption_score).")
        L.append("")
        L.extend(_run_table(hi, hierarchy=True))
        L.append("")
        if "pathologies.png" in r.get("plots", []):
            L.append("![pathologies](pathologies.png)")
            L.append("")
    elif r.get("hierarchy_unavailable"):
        L.append("## 5. Pathologies")
        L.append("")
        L.append(f"The hierarchical bench could not be built at this size ({r['hierarchy_unavailable']}); dead "
                 "fractions on the plain bench are in the table of section 1-2.")
        L.append("")
    return L


def _md_timings(r: dict) -> list:
    """Timings."""
    L = []
    L.append("## Timings (s)")
    L.append("")
    L.append(", ".join(f"{k} {_f(v, '.1f')}" for k, v in r["timings"].items()))
    L.append("")
    return L


def _markdown(r: dict) -> str:
    """``report.md``: every section of the report in reading order."""
    parts = (_md_header, _md_checks, _md_frontier, _md_critical, _md_retrain, _md_hierarchy, _md_timings)
    return "\n".join(line for part in parts for line in part(r))


def _findings(r):
    s = r.get("summary", {})
    out = []
    if s.get("failed_checks"):
        out.append(f"- Mechanical checks failed: {', '.join(s['failed_checks'])} (details in section 6).")
    else:
        out.append("- All mechanical checks pass.")
    if "shrinkage_by_coef" in s:
        vals = ", ".join(f"{k}: {_f(v)}" for k, v in s["shrinkage_by_coef"].items())
        trend = ("below 1 and growing with the coefficient" if s.get("shrinkage_below_1") and s.get("shrinkage_grows_with_coef")
                 else "below 1" if s.get("shrinkage_below_1") else "not uniformly below 1")
        out.append(f"- Shrinkage of matched latents (median slope of decoded magnitude on the true coefficient, "
                   f"at the coefficients where at least half the features are matched): {vals}; {trend}.")
    if "ground_truth_twin" in s:
        v = s["ground_truth_twin"]
        out.append("- Ground truth on the interference-free twin: " + ", ".join(f"lambda {k}: {x}" for k, x in v.items())
                   + ".")
    if "ground_truth_bench" in s:
        v = s["ground_truth_bench"]
        out.append("- Ground truth on the bench (relative to the interference floor): "
                   + ", ".join(f"lambda {k}: {x}" for k, x in v.items()) + ".")
    if "vs_topk_at_matched_l0" in s:
        out.append(f"- Recovery against TopK at matched L0 (TopK interpolated in L0; mean over the grid, penalty minus "
                   f"TopK): M_GT encoder {_f(s['mean_m_gt_minus_topk'], '+.3f')}, M_GT decoder "
                   f"{_f(s['mean_m_gt_dec_minus_topk'], '+.3f')}, MCC {_f(s['mean_mcc_minus_topk'], '+.3f')}: "
                   f"{'lower than TopK' if s.get('recovery_below_topk') else 'not lower than TopK'}.")
    if "pathologies_hierarchical" in s:
        out.append("- Hierarchical bench: " + "; ".join(
            f"{k}: dead {_f(v['dead_fraction'], '.2f')}, absorption {_f(v['absorption'], '.2f')}"
            for k, v in s["pathologies_hierarchical"].items()) + ".")
    return out


def _run_table(runs, hierarchy=False):
    L = ["| penalty | lambda / k | L0 | FVU | M_GT (dec) | M_IP | MCC | shrinkage | dead | " +
         ("absorption |" if hierarchy else ""),
         "|---|---|---|---|---|---|---|---|---|" + ("---|" if hierarchy else "")]
    for nm, v in runs.items():
        if "error" in v:
            L.append(f"| {nm} | training failed: {v['error']} |")
            continue
        for p in v["points"]:
            row = (f"| {nm} | {_label(nm, p)} | {_f(p['l0'])} | {_f(p['fvu'])} | {_f(p['m_gt'], '.2f')} "
                   f"({_f(p['m_gt_dec'], '.2f')}) | {_f(p['m_ip'])} | {_f(p['mcc'])} | {_f(p['shrinkage'])} "
                   f"({_f(p.get('shrinkage_matched'))}) "
                   f"| {_f(p['dead_fraction'], '.2f')} |")
            if hierarchy:
                row += f" {_f(p.get('absorption'), '.2f')} |"
            if p.get("diverged_at") is not None:
                row += f" diverged at step {p['diverged_at']}"
            L.append(row)
    return L


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------


def _color(nm: str, name: str) -> str:
    return "tab:red" if nm == name else COLORS.get(nm, "tab:gray")


def _plot_frontier(runs: dict, name: str, out_dir: str) -> str:
    """FVU and recovery (M_GT, MCC) against L0 for every run."""
    fig = Figure(figsize=(11, 4))
    ax = fig.subplots(1, 2)
    for nm, v in runs.items():
        pts = sorted(v["points"], key=lambda p: p["l0"])
        ax[0].plot([p["l0"] for p in pts], [p["fvu"] for p in pts], "o-", color=_color(nm, name), label=nm)
        ax[1].plot([p["l0"] for p in pts], [p["m_gt"] for p in pts], "o-", color=_color(nm, name), label=f"{nm} M_GT")
        ax[1].plot([p["l0"] for p in pts], [p["mcc"] for p in pts], "s--", color=_color(nm, name), alpha=0.6,
                   label=f"{nm} MCC")
    ax[0].set_xlabel("L0 (mean active latents)")
    ax[0].set_ylabel("FVU")
    ax[0].set_yscale("log")
    ax[0].set_title("sparsity-fidelity frontier")
    ax[1].set_xlabel("L0")
    ax[1].set_ylabel("M_GT(0.95) / MCC")
    ax[1].set_title("recovery along the frontier")
    ax[0].legend(fontsize=8)
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "frontier.png"), dpi=100)
    return "frontier.png"


def _plot_recovery(runs: dict, name: str, out_dir: str) -> str:
    """M_GT(tau) curves of every point."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"]
    for nm, v in runs.items():
        pts = v["points"]
        for j, p in enumerate(pts):
            ls = "-" if nm == name else ":"
            ax.plot(TAUS, p["m_gt_curve"], ls, color=cmap(j / max(len(pts) - 1, 1)) if nm == name else _color(nm, name),
                    alpha=1.0 if nm == name else 0.5, label=f"{nm} {_label(nm, p)}" if nm == name or j == 0 else None)
    ax.set_xlabel("cosine threshold tau")
    ax.set_ylabel("M_GT(tau)")
    ax.set_title("feature recovery M_GT(tau), every point")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "recovery.png"), dpi=100)
    return "recovery.png"


def _plot_shrinkage(runs: dict, name: str, out_dir: str) -> str:
    """Shrinkage of matched latents against L0."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for nm, v in runs.items():
        if nm == "topk":
            pts = v["points"]
            ax.plot([p["l0"] for p in pts], [p["shrinkage"] for p in pts], "o-", color=_color(nm, name), label=nm)
        else:
            pts = sorted(v["points"], key=lambda p: p["coef"])
            ax.plot([p["l0"] for p in pts], [p["shrinkage"] for p in pts], "o-", color=_color(nm, name), label=nm)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("L0")
    ax.set_ylabel("decoded magnitude / true coefficient")
    ax.set_title("shrinkage of matched latents")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "shrinkage.png"), dpi=100)
    return "shrinkage.png"


def _plot_critical(crit: dict, out_dir: str) -> str:
    """Gradient norm and smallest Hessian eigenvalue at W* against lambda."""
    fig = Figure(figsize=(11, 4))
    ax = fig.subplots(1, 2)
    for label, mk in (("bench", "o-"), ("twin", "s--")):
        c = crit.get(label, {})
        if "points" not in c:
            continue
        pts = c["points"]
        ax[0].plot([p["coef"] for p in pts], [p["grad_norm"] for p in pts], mk, label=f"{label}")
        ax[0].axhline(c["floor"]["grad_norm"], ls=":", color="gray")
        hs = [p.get("hessian", {}).get("min", np.nan) for p in pts]
        ax[1].plot([p["coef"] for p in pts], hs, mk, label=label)
    ax[0].set_xscale("log")
    ax[0].set_xlabel("lambda")
    ax[0].set_ylabel("||grad L|| at W*")
    ax[0].set_title("gradient at ground truth (dotted: lambda = 0)")
    ax[1].set_xscale("log")
    ax[1].set_xlabel("lambda")
    ax[1].set_ylabel("smallest Hessian eigenvalue")
    ax[1].axhline(0.0, color="k", lw=0.8)
    ax[1].set_title("curvature at ground truth")
    ax[0].legend(fontsize=8)
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "critical.png"), dpi=100)
    return "critical.png"


def _plot_pathologies(hi: dict, name: str, out_dir: str) -> str:
    """Dead fraction and absorption on the hierarchical bench."""
    fig = Figure(figsize=(11, 4))
    ax = fig.subplots(1, 2)
    for nm, v in hi.items():
        pts = sorted(v["points"], key=lambda p: p["l0"])
        ax[0].plot([p["l0"] for p in pts], [p["dead_fraction"] for p in pts], "o-", color=_color(nm, name), label=nm)
        ax[1].plot([p["l0"] for p in pts], [p.get("absorption", np.nan) for p in pts], "o-", color=_color(nm, name),
                   label=nm)
    ax[0].set_xlabel("L0")
    ax[0].set_ylabel("dead fraction")
    ax[1].set_xlabel("L0")
    ax[1].set_ylabel("absorption")
    ax[0].set_title("dead latents (hierarchical bench)")
    ax[1].set_title("absorption (hierarchical bench)")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "pathologies.png"), dpi=100)
    return "pathologies.png"


def _plots(r: dict, out_dir: str) -> list:
    """Write the report's PNGs (matplotlib's Figure API: no pyplot state, no backend switch) and
    return their file names."""
    name = r["penalty"]
    made = []
    runs = {k: v for k, v in (r.get("frontier") or {}).items() if "points" in v}
    if runs:
        made += [_plot_frontier(runs, name, out_dir), _plot_recovery(runs, name, out_dir),
                 _plot_shrinkage(runs, name, out_dir)]
    crit = r.get("critical") or {}
    if any("points" in c for c in crit.values()):
        made.append(_plot_critical(crit, out_dir))
    hi = {k: v for k, v in (r.get("hierarchy") or {}).items() if "points" in v}
    if hi:
        made.append(_plot_pathologies(hi, name, out_dir))
    return made
