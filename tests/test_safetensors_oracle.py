"""jsdl's own .safetensors codec (jsdl.data.files) agrees with the reference implementation, the
`safetensors` package (a dev-only dependency: jsdl itself does not import it)."""
import numpy as np
import pytest

from jsdl.data import files as F

st_numpy = pytest.importorskip("safetensors.numpy")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_jsdl_writer_read_by_the_reference(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(7, 5)).astype(dtype), "b": rng.normal(size=(3, 2)).astype(dtype)}
    path = str(tmp_path / "x.safetensors")
    F.write_safetensors(path, tensors, metadata={"source": "test"})
    back = st_numpy.load_file(path)
    assert sorted(back) == ["a", "b"]
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_reference_writer_read_by_jsdl(tmp_path, dtype):
    rng = np.random.default_rng(1)
    tensors = {"first": rng.normal(size=(4, 3)).astype(dtype), "acts": rng.normal(size=(11, 6)).astype(dtype)}
    path = str(tmp_path / "y.safetensors")
    st_numpy.save_file(tensors, path)
    for k, v in tensors.items():
        shard = F.open_shard(path, key=k)
        assert (shard.n_rows, shard.d) == v.shape and shard.dtype == v.dtype
        np.testing.assert_array_equal(shard.read(0, shard.n_rows), v)
        np.testing.assert_array_equal(shard.read(2, 4), v[2:4])
