"""The C kernels of ``mindformers_sigma/native/`` against independent float64 references."""

from __future__ import annotations

import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from mindformers_sigma.model.layers import LayerNorm
from mindformers_sigma.native import layer_norm as native


def _layer_norm64(x, gamma, beta, eps):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * gamma + beta


class _WeightedSum(nn.Cell):
    """sum(LayerNorm(x) * w): its gradient is the backward fed the cotangent w."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def construct(self, x, w):
        return (self.norm(x) * w).sum()


def _norm(width, eps, rng, use_native):
    saved = native.ENABLED["native_kernels"]
    native.ENABLED["native_kernels"] = use_native
    try:
        norm = LayerNorm(width, eps)
    finally:
        native.ENABLED["native_kernels"] = saved
    assert (norm.native is not None) == use_native  # CI's machines have a compiler: the kernel is what runs
    norm.gamma.set_data(Tensor(rng.standard_normal(width).astype(np.float32)))
    norm.beta.set_data(Tensor(rng.standard_normal(width).astype(np.float32)))
    return norm


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
def test_the_native_layer_norm_and_its_backward_match_float64_finite_differences(mode):
    """Rows with a large common offset (the variance's cancellation) and an odd width.  The forward must be
    float32-accurate against float64 numpy; dx, dgamma and dbeta against central finite differences of the
    float64 forward (an independent derivative: no gradient formula is shared with the kernel)."""
    ms.set_context(mode=mode)
    rng = np.random.default_rng(3)
    shape, eps = (2, 5, 37), 1e-5
    x = (rng.standard_normal(shape) * 3 + 50).astype(np.float32)
    w = rng.standard_normal(shape).astype(np.float32)
    norm = _norm(shape[-1], eps, rng, use_native=True)
    gamma, beta = (p.asnumpy().astype(np.float64) for p in (norm.gamma, norm.beta))
    x64, w64 = x.astype(np.float64), w.astype(np.float64)

    expected = _layer_norm64(x64, gamma, beta, eps)
    got = norm(Tensor(x)).asnumpy()
    # float32 arithmetic on standardised values: a few ulps of the output's scale
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()

    loss = _WeightedSum(norm)
    grads = ms.value_and_grad(loss, grad_position=0, weights=[norm.gamma, norm.beta])(Tensor(x), Tensor(w))[1]
    dx, (dgamma, dbeta) = grads[0].asnumpy(), (g.asnumpy() for g in grads[1])

    def total(xv=x64, g=gamma, b=beta):
        return float((_layer_norm64(xv, g, b, eps) * w64).sum())

    step = 1e-6
    numeric_dx = np.zeros_like(x64)
    for index in np.ndindex(shape):
        up, down = x64.copy(), x64.copy()
        up[index] += step
        down[index] -= step
        numeric_dx[index] = (total(xv=up) - total(xv=down)) / (2 * step)
    numeric_dgamma, numeric_dbeta = np.zeros_like(gamma), np.zeros_like(beta)
    for i in range(shape[-1]):
        basis = np.zeros_like(gamma)
        basis[i] = step
        numeric_dgamma[i] = (total(g=gamma + basis) - total(g=gamma - basis)) / (2 * step)
        numeric_dbeta[i] = (total(b=beta + basis) - total(b=beta - basis)) / (2 * step)
    # dx = rstd * (...): rstd ~ 1/3 here, the bracket float32-accurate to ~1e-6 of its terms
    for name, kernel, numeric in (("dx", dx, numeric_dx), ("dgamma", dgamma, numeric_dgamma),
                                  ("dbeta", dbeta, numeric_dbeta)):
        assert np.abs(kernel - numeric).max() <= 2e-5 * np.abs(numeric).max(), name


def test_the_model_layer_norm_gives_mindspores_result_with_and_without_the_kernel():
    """The two paths of ``model.layers.LayerNorm`` (the kernel, ``ops.LayerNorm``): the same forward and
    gradients to float32 rounding, in a training graph."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(4)
    shape = (4, 64, 256)
    x = Tensor(rng.standard_normal(shape).astype(np.float32))
    w = Tensor(rng.standard_normal(shape).astype(np.float32))
    results = []
    for use_native in (True, False):
        norm = _norm(shape[-1], 1e-5, np.random.default_rng(9), use_native)
        loss = _WeightedSum(norm)
        value, grads = ms.jit(ms.value_and_grad(loss, grad_position=0, weights=[norm.gamma, norm.beta]))(x, w)
        results.append([norm(x).asnumpy(), grads[0].asnumpy()] + [g.asnumpy() for g in grads[1]])
    for name, kernel, reference in zip(("y", "dx", "dgamma", "dbeta"), *results):
        # dgamma and dbeta sum 256 rows: their rounding grows with the row count
        assert np.abs(kernel - reference).max() <= 1e-5 * np.abs(reference).max(), name


def test_the_kernel_is_left_out_off_cpu_or_when_the_config_turns_it_off(monkeypatch):
    monkeypatch.setitem(native.ENABLED, "native_kernels", False)
    assert native.native_layer_norm() is None
    monkeypatch.setitem(native.ENABLED, "native_kernels", True)
    monkeypatch.setattr(ms, "get_context", lambda key: "Ascend" if key == "device_target" else None)
    assert native.native_layer_norm() is None


def test_a_damaged_cached_library_is_built_again_and_no_compiler_means_no_kernel(tmp_path, monkeypatch, capsys):
    from mindformers_sigma.native.build import built_library

    import shutil
    import subprocess
    import sys

    from mindformers_sigma.ecss import fused_kernel

    monkeypatch.setenv("PANGU_SIGMA_CACHE", str(tmp_path))
    path = built_library(native.SOURCE, native.FLAGS, "LayerNormForward")
    assert path is not None and path.startswith(str(tmp_path))
    size = os.path.getsize(path)
    # cut short on disk (a truncated library crashed the loader itself with SIGBUS), or another library
    for damage in ("truncate", "another library"):
        if damage == "truncate":
            os.truncate(path, size // 2)
        else:
            shutil.copyfile(built_library(fused_kernel.SOURCE, fused_kernel.FLAGS, "adamw_rows"), path)
        assert built_library(native.SOURCE, native.FLAGS, "LayerNormForward") == path, damage
        assert os.path.getsize(path) == size
        # rebuilt: it loads and holds the kernel (checked in a child: this process must not map a file it rewrites)
        check = "import ctypes, sys; ctypes.CDLL(sys.argv[1]).LayerNormForward"
        assert subprocess.run([sys.executable, "-c", check, path]).returncode == 0, damage
    monkeypatch.setenv("PANGU_SIGMA_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert built_library(native.SOURCE, native.FLAGS, "LayerNormForward") is None
    monkeypatch.setattr(native, "_built", {})
    assert native.native_layer_norm() is None
    assert "MindSpore's LayerNorm runs instead" in capsys.readouterr().err
    assert LayerNorm(8, 1e-5).native is None  # the model falls back to ops.LayerNorm
