"""Every experiment runs at its ``tiny`` scale, so none of them rots."""
import json
import os

import pytest

from jsdl import experiments as E

NAMES = E.available()


def test_experiments_exist():
    assert NAMES, "no experiments found under experiments/"


@pytest.mark.parametrize("name", NAMES)
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
