"""`jsdl demo --quick` runs end to end and writes its report and plot."""
import json

from jsdl.cli import main


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["variants"]) == {"relu_l1", "jumprelu_l0", "topk", "batchtopk"}
    for row in res["variants"].values():
        assert 0 <= row["m_gt_0.9"] <= 1 and 0 <= row["m_ip"] <= 1 and row["fvu"] >= 0
    land = res["landscape_topk"]
    assert land["monosemantic"] + land["polysemantic"] + land["dead_for_single_features"] == land["n_latents"]
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "landscape check" in out and "wrote" in out


def test_cli_help_lists_commands(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "train", "theory-check", "experiment", "bench", "export", "penalty-lab"):
        assert cmd in out
