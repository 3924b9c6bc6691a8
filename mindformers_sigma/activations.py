"""The FFN activations (``model.activation``), written the way MindSpore's CPU backend runs fastest.

``fast_gelu`` is ``x * sigmoid(1.702 x)``, this project's default.  ``ops.fast_gelu`` computes the same
function with its own kernel, which measured 27 ms forward on [2048, 1024] against 3 ms for this
composition (forward + backward: 25 ms against 6 ms; pangu-sigma bench kernels, docs/benchmarks.md).

``gelu`` is the tanh approximation ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` that MindSpore's
``nn.GELU`` / ``ops.GeLU`` compute, and so what the official PanGu-α releases compute: an imported
PanGu-α runs with it.  It is written as the identical ``x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))``:
MindSpore's CPU ``ops.tanh`` is off by up to 1e-4 (measured), its sigmoid by 7e-7, so this form agrees
with ``ops.GeLU`` to float32 rounding (tests/test_pangu_alpha.py) at 13 ms forward + backward on
[2048, 1024] against 76 ms for ``ops.GeLU`` (one run).
"""

import math

from mindspore import ops

_TWICE_TANH_SCALE = 2.0 * math.sqrt(2.0 / math.pi)


def fast_gelu(x):
    return x * ops.sigmoid(1.702 * x)


def gelu(x):
    return x * ops.sigmoid(_TWICE_TANH_SCALE * (x + 0.044715 * x * x * x))


ACTIVATIONS = {"fast_gelu": fast_gelu, "gelu": gelu}
