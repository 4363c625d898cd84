"""The one JSON encoder and the locked RESULTS.md section writer."""
import json
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from jsdl import records


def test_to_jsonable_numpy_jax_and_non_finite():
    obj = {"a": np.float32(1.5), "b": jnp.array([1.0, np.nan]), "c": np.int64(3), "d": np.bool_(True),
           "e": float("inf"), 1: (1, 2), "f": jnp.float32(2.0), "g": np.array(-np.inf), "h": [np.float64(np.nan)]}
    out = records.to_jsonable(obj)
    assert out == {"a": 1.5, "b": [1.0, None], "c": 3, "d": True, "e": None, "1": [1, 2], "f": 2.0, "g": None,
                   "h": [None]}
    assert type(out["c"]) is int and type(out["a"]) is float and type(out["d"]) is bool
    text = records.dumps(obj)  # strict JSON: no NaN / Infinity tokens
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == out


def test_to_jsonable_objects():
    class R:
        def to_json(self):
            return {"x": np.float64(2.0)}

    assert records.to_jsonable(R()) == {"x": 2.0}
    assert records.to_jsonable({"o": object}) == {"o": str(object)}


def _writer(path, i):
    records.write_section(path, f"section {i}", f"body {i}\n" * 50)


def test_write_section_replaces_keeps_and_survives_concurrent_writers(tmp_path):
    path = str(tmp_path / "RESULTS.md")
    records.write_section(path, "one", "first", header="# Results\n")
    records.write_section(path, "two", "second\n\n### sub\ntext")
    records.write_section(path, "one", "replaced")
    header, secs = records.read_sections(path)
    assert header.startswith("# Results")
    assert [t for t, _ in secs] == ["one", "two"]
    assert secs[0][1].strip() == "replaced" and "### sub" in secs[1][1]
    with pytest.raises(ValueError, match="title"):
        records.write_section(path, "a\nb", "x")
    # flock locks belong to an open file description, so writers in threads exclude each other as
    # processes do
    procs = [threading.Thread(target=_writer, args=(path, i)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    _, secs = records.read_sections(path)
    assert sorted(t for t, _ in secs) == sorted(["one", "two"] + [f"section {i}" for i in range(8)])
    assert all(b.strip() == (f"body {t.split()[-1]}\n" * 50).strip() for t, b in secs if t.startswith("section"))
