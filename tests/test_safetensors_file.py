"""The streaming safetensors writer and reader agree with MindSpore's own (``training/safetensors_file.py``)."""

from __future__ import annotations

import struct

import mindspore as ms
import numpy as np
import pytest

from mindformers_sigma.checkpoint import files as ckpt
from mindformers_sigma.checkpoint import safetensors_file as st
from mindformers_sigma.errors import DataError


def _arrays():
    rng = np.random.default_rng(7)
    return {"b.weight": rng.standard_normal((3, 5, 7)).astype(np.float32),
            "a.half": rng.standard_normal((4, 2)).astype(np.float16),
            "table": rng.integers(-5, 5, (6, 9)).astype(np.int32),
            "global_step": np.array([12], np.int64),
            "scale": np.array(1024.0, np.float32)}


def test_mindspore_reads_what_we_write_and_we_read_what_mindspore_writes(tmp_path, monkeypatch):
    arrays = _arrays()
    monkeypatch.setattr(st, "CHUNK_BYTES", 24)  # many chunks per tensor, and chunks that split rows
    ours = str(tmp_path / "ours.safetensors")
    st.write_safetensors(ours, arrays)
    loaded = ms.load_checkpoint(ours, format="safetensors")
    assert sorted(loaded) == sorted(arrays)
    for name, array in arrays.items():
        got = loaded[name].asnumpy()
        assert got.dtype == array.dtype and got.shape == array.shape and np.array_equal(got, array), name
    theirs = str(tmp_path / "theirs.safetensors")
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in arrays.items()], theirs, format="safetensors")
    start, header = st.read_header(theirs)
    for name, array in arrays.items():
        out = np.empty_like(array)
        st.copy_tensor(theirs, start, header[name], out)
        assert np.array_equal(out, array), name


def _checkpoint(tmp_path, arrays):
    path = ckpt.save_checkpoint(str(tmp_path), 1, arrays, {"data_position": 0}, "safetensors", keep=1)
    return ckpt.read_checkpoint(path[:-len(".safetensors")] + ".json")


@pytest.mark.parametrize("damage, problem", [
    (lambda data: struct.pack("<Q", 10 ** 12) + data[8:], "header length"),
    (lambda data: data[:8] + b"{not json" + data[17:], "not JSON"),
    (lambda data: data[:-20], "data_offsets"),
])
def test_a_damaged_safetensors_checkpoint_is_one_error_line(tmp_path, damage, problem):
    arrays = _arrays()
    info = _checkpoint(tmp_path, arrays)
    with open(info.weights_path, "rb") as handle:
        data = handle.read()
    with open(info.weights_path, "wb") as handle:  # damaged after the sha256 check passed
        handle.write(damage(data))
    targets = {name: np.empty_like(array) for name, array in arrays.items()}
    with pytest.raises(DataError, match=rf"cannot be read as a safetensors checkpoint \(.*{problem}"):
        ckpt.copy_into(info, targets, "resume")


def test_copy_into_refuses_a_tensor_of_another_shape_and_fills_the_right_ones_exactly(tmp_path):
    arrays = _arrays()
    info = _checkpoint(tmp_path, arrays)
    with pytest.raises(DataError, match=r"resume: table is int32 of shape \(6, 9\), the model needs int32 of "
                                        r"shape \(9, 6\)"):
        ckpt.copy_into(info, {"table": np.empty((9, 6), np.int32)}, "resume")
    memory_mapped = np.lib.format.open_memmap(str(tmp_path / "w.npy"), mode="w+", dtype=np.float32, shape=(3, 5, 7))
    ckpt.copy_into(info, {"b.weight": memory_mapped}, "resume")
    assert np.array_equal(memory_mapped, arrays["b.weight"])
