"""The documentation site builds with `mkdocs build --strict` (a broken page link, anchor or API
reference fails the suite), and the design document lives in the repository."""
import os
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")
pytest.importorskip("material")


def _build(config: str, site: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", config,
                           "--site-dir", site], capture_output=True, text=True, env=env, timeout=300)


def _copy_site_sources(tmp_path):
    """mkdocs.yml and docs/ copied under tmp_path, the API reference still read from this tree."""
    with open(os.path.join(ROOT, "mkdocs.yml")) as f:
        cfg = yaml.safe_load(f)
    shutil.copytree(os.path.join(ROOT, "docs"), tmp_path / "docs")
    cfg["docs_dir"] = str(tmp_path / "docs")
    for plugin in cfg["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            plugin["mkdocstrings"]["handlers"]["python"]["paths"] = [ROOT]
    path = tmp_path / "mkdocs.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_site_builds_strict(tmp_path):
    r = _build(os.path.join(ROOT, "mkdocs.yml"), str(tmp_path / "site"))
    assert r.returncode == 0, r.stdout + r.stderr
    for page in ("index.html", "design/index.html", "api/penalties/index.html", "api/train/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "api" / "penalties" / "index.html").read_text()
    assert "jsdl.penalties.register" in api  # rendered from the docstrings


@pytest.mark.parametrize("broken", ["::: jsdl.no_such_module\n", "[missing page](no_such_page.md)\n"])
def test_broken_reference_fails_the_build(tmp_path, broken):
    cfg = _copy_site_sources(tmp_path)
    with open(tmp_path / "docs" / "cli.md", "a") as f:
        f.write("\n" + broken)
    r = _build(str(cfg), str(tmp_path / "site"))
    assert r.returncode != 0
    assert "no_such" in r.stdout + r.stderr


def test_design_document_is_in_the_repository():
    text = open(os.path.join(ROOT, "docs", "design.md")).read()
    for heading in ("## Public contract", "## Conventions", "## Pitfalls measured"):
        assert heading in text
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "docs/design.md" in readme and "](DESIGN.md)" not in readme and "`DESIGN.md`" not in readme
