"""Dropout whose mask is a pure function of (step seed, dropout site, element index).

MindSpore's ``nn.Dropout`` keeps its random state inside the kernel: a resumed run restarts
the mask sequence, so it cannot continue an interrupted run bitwise, and recompute or a
data-parallel rank cannot be made to reproduce a given mask.  Here the trainer passes one
integer seed per micro-batch (derived from the config seed, the step and the micro-batch's
place in the global batch); each site hashes ``(seed, site, index)`` with integer
arithmetic (the "lowbias32" mixer), which is the same on every device and machine.
Without a seed (evaluation, generation) dropout is the identity.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

_MASK32 = 0xFFFFFFFF
_SITE_STRIDE = 0x85EBCA6B
_SEED_STRIDE = 0x9E3779B9


def _mix32(value):
    """lowbias32 on non-negative int64 values below 2**32 (shifts written as floor divisions)."""
    value = ops.bitwise_xor(value, value // 65536)
    value = ops.bitwise_and(value * 0x7FEB352D, _MASK32)
    value = ops.bitwise_xor(value, value // 32768)
    value = ops.bitwise_and(value * 0x846CA68B, _MASK32)
    return ops.bitwise_xor(value, value // 65536)


def _element_index(shape: tuple, split: tuple):
    """Each element's row-major index in the whole tensor, of which ``shape`` holds, along axis ``split[0]``,
    the entries ``split[1] ...`` of ``split[2]``."""
    axis, offset, whole = split
    index = ops.zeros(shape, ms.int64)
    for dim, size in enumerate(shape):
        steps = ops.arange(size, dtype=ms.int64) + (offset if dim == axis else 0)
        extent = whole if dim == axis else size
        index = index * extent + steps.reshape((1,) * dim + (size,) + (1,) * (len(shape) - dim - 1))
    return index


def uniform_from_seed(shape: tuple, seed, site: int, split=None):
    """``[shape]`` float32 values in [0, 1), determined by the int64 ``seed`` tensor and ``site``;
    ``split`` (axis, offset, whole size): ``shape`` is that slice of a larger tensor, whose values it gets."""
    count = 1
    for size in shape:
        count *= size
    key = _mix32(ops.bitwise_and(seed * _SEED_STRIDE + site * _SITE_STRIDE, _MASK32))
    index = ops.arange(count, dtype=ms.int64).reshape(shape) if split is None else _element_index(shape, split)
    return _mix32(ops.bitwise_xor(index, key)).astype(ms.float32) * (1.0 / 4294967296.0)


class SeededDropout(nn.Cell):
    """Zero each element with probability ``rate`` and scale the rest by ``1 / (1 - rate)``."""

    def __init__(self, rate: float, site: int, split: tuple = None):
        """``split`` (axis, offset, whole size): the input is that slice of the tensor one process drops
        from (attention heads split over model-parallel ranks), and gets that tensor's mask."""
        super().__init__()
        self.rate = rate
        self.site = site
        self.split = split

    def construct(self, x, seed=None):
        if seed is None or self.rate == 0.0:
            return x
        keep = uniform_from_seed(x.shape, seed, self.site, self.split) >= self.rate
        return x * keep.astype(x.dtype) * (1.0 / (1.0 - self.rate))
