"""Every experiment runs at its ``tiny`` scale, so none of them rots."""
import json
import os

import pytest

from jsdl import experiments as E

NAMES = E.available()
# The experiments whose tiny run takes 20-45 s on 2 cores run in `make test-slow`.
SLOW = {"landscape_during_training", "absorption", "ablations", "dead_latents", "identifiability"}


def test_experiments_exist():
    assert NAMES, "no experiments found under experiments/"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in NAMES])
def test_experiment_runs_tiny(name, tmp_path):
    summary = E.run_experiment(name, "tiny", str(tmp_path))
    assert isinstance(summary, dict) and summary
    assert (tmp_path / "summary.json").is_file()
    produced = os.listdir(tmp_path)
    assert any(f.endswith(".png") for f in produced), f"{name}: no plot written ({produced})"
    assert any(f.endswith(".json") and f not in ("summary.json", "config.json") for f in produced) or summary, produced
    json.loads((tmp_path / "summary.json").read_text())


def test_unknown_experiment_and_setting():
    with pytest.raises(ValueError, match="unknown experiment"):
        E.load_config("no_such_experiment", "small")
    if NAMES:
        with pytest.raises(ValueError, match="has no setting"):
            E.run_experiment(NAMES[0], "tiny", overrides={"definitely_not_a_key": 1})
        with pytest.raises(ValueError, match="unknown train settings"):
            E.run_experiment(NAMES[0], "tiny", overrides={"train.stepz": 1})


@pytest.mark.parametrize("name", NAMES)
def test_one_config_dialect(name):
    """Every experiment, at every scale, speaks the dialect of `jsdl train`: a data section of
    make_bench arguments and a train section of TrainConfig fields, both checked; n_latents, not
    n_q; no bench or training key outside its section."""
    for scale in E.SCALES:
        cfg = E.load_config(name, scale)
        assert set(cfg["data"]) <= E.section_keys("data") and set(cfg["train"]) <= E.section_keys("train")
        stray = {"n", "d", "n_q", "n_features", "d_input", "sparsity", "max_interference", "steps", "batch_size",
                 "learning_rate", "log_every"} & set(cfg)
        assert not stray, f"{name} ({scale}): {sorted(stray)} outside the data/train sections"


def test_dotted_overrides():
    cfg = E.apply_overrides({"data": {"n_features": 4}, "train": {}, "k": 1},
                            {"data.n_features": 8, "train.steps": 3, "k": 2})
    assert cfg == {"data": {"n_features": 8}, "train": {"steps": 3}, "k": 2}
