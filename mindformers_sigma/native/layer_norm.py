"""LayerNorm as an ``ops.Custom`` AOT kernel (``layer_norm.c``) with its own backward, on CPU.

MindSpore's CPU LayerNorm and LayerNormGrad took 9-11% of a T1 step (``pangu-sigma bench profile``);
this pair runs the same forward and backward 2.7x faster (measured on the T1 shapes).  It is used only
when the device is CPU and ``context.native_kernels`` is on (``context.configure_context`` sets
:data:`ENABLED`), and only if the machine's compiler built it; otherwise the model keeps
``ops.LayerNorm``.  ``tests/test_native_kernels.py`` checks both directions against float64 numpy.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "layer_norm.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")

ENABLED = {"native_kernels": True}  # set by context.configure_context from the config
_built: dict = {}


def _primitive() -> Optional[Callable]:
    """The forward primitive (its backward attached), built once; None without a compiler."""
    if "forward" in _built:
        return _built["forward"]
    from mindspore import ops

    from mindformers_sigma.native.build import built_library

    path = built_library(SOURCE, FLAGS, "LayerNormForward")
    forward = None
    if path is None:
        print("native kernels: no C compiler built layer_norm.c; MindSpore's LayerNorm runs instead", file=sys.stderr)
    else:
        backward = ops.Custom(f"{path}:LayerNormBackward", func_type="aot",
                              out_shape=lambda x, gamma, mean, rstd, dy: (x, gamma, gamma),
                              out_dtype=lambda x, gamma, mean, rstd, dy: (x, gamma, gamma))

        def bprop(x, gamma, beta, epsilon, out, dout):
            dx, dgamma, dbeta = backward(x, gamma, out[1], out[2], dout[0])
            return dx, dgamma, dbeta, ops.zeros_like(epsilon)

        forward = ops.Custom(f"{path}:LayerNormForward", func_type="aot", bprop=bprop,
                             out_shape=lambda x, gamma, beta, epsilon: (x, x[:-1], x[:-1]),
                             out_dtype=lambda x, gamma, beta, epsilon: (x, x, x))
    _built["forward"] = forward
    return forward


def native_layer_norm() -> Optional[Callable]:
    """``(x, gamma, beta, epsilon) -> (y, mean, rstd)`` in float32 on CPU, or None where it does not apply."""
    import mindspore as ms

    if not ENABLED["native_kernels"] or ms.get_context("device_target") != "CPU":
        return None
    return _primitive()
