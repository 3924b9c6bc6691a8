"""Training steps: forward/backward with loss scaling, overflow skip, clipping, update.

``ForwardBackward`` and ``ApplyGradients`` are separate cells so that gradient accumulation
can run several forward/backward passes before one update; ``TrainOneStepCell`` fuses them
into one graph for the common case of no accumulation.  :func:`run_step` drives either and
turns the statistics into the reported loss on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from mindformers_sigma.config import TrainConfig
from mindformers_sigma.parallel.gradients import GlobalNorm

_hyper_map = ops.HyperMap()
_scale_by = ops.MultitypeFuncGraph("scale_by")
_sum_of_squares = ops.MultitypeFuncGraph("sum_of_squares")


@_scale_by.register("Tensor", "Tensor")
def _scale_grad(factor, grad):
    return grad * ops.cast(factor, grad.dtype)


@_sum_of_squares.register("Tensor")
def _grad_sum_of_squares(grad):
    """Reduced along the last axis first: on CPU that is 4-7x faster than one all-axes ReduceSum
    (2.0 against 17.6 ms for a [16, 1024, 256] expert gradient, pangu-sigma bench kernels)."""
    squared = ops.square(grad.astype(ms.float32))
    if squared.ndim > 1:
        squared = squared.reshape((-1, squared.shape[-1])).sum(1)
    return squared.sum()


def unscale_and_clip(grads, inverse_scale, clip_norm: float, extra_squares=None, norm_weights=None, world_sum=None,
                     applied: Optional[int] = None):
    """Unscaled gradients, clipped to global norm ``clip_norm`` (0: no clipping), whether all are
    finite, the factor applied (unscale times clip) and the unscaled global norm before clipping.
    ``applied``: only the first that many gradients are returned scaled; the others count in the norm
    and the check, and their holder scales them by the factor (ECSS's host, in its update's own pass).
    ``extra_squares``: the sum of squares of (scaled) gradients held elsewhere (ECSS's host-summed
    expert gradients), which count in the norm and the check the same way.

    Over several ranks (``world_sum``) each gradient's sum of squares is weighted by one over the number
    of ranks holding the same slice (``norm_weights``) and the weighted sums are summed over the world:
    the norm of the whole model's gradient, each slice counted once.

    One sum of squares per gradient serves both the finiteness check and the norm, and the
    unscale and the clip are one multiplication: an inf or nan anywhere makes the sum non-finite.
    So does a finite gradient whose squared norm overflows float32 (above 1.8e19): it is skipped
    like an overflow, and a dynamic loss scale lowers the scale.
    """
    per_gradient = ops.stack(_hyper_map(_sum_of_squares, grads))
    if norm_weights is not None:
        per_gradient = per_gradient * norm_weights
    squares = per_gradient.sum()
    if extra_squares is not None:
        squares = squares + extra_squares
    if world_sum is not None:
        squares = world_sum(squares)
    finite = ops.isfinite(squares)
    norm = ops.sqrt(squares) * inverse_scale
    factor = inverse_scale
    if clip_norm > 0:
        factor = inverse_scale * clip_norm / ops.maximum(norm, clip_norm)
    if applied is not None:
        grads = grads[:applied]
    return _hyper_map(ops.partial(_scale_by, factor), grads), finite, factor, norm


class DynamicLossScale(nn.Cell):
    """Loss-scale state kept as Parameters (so it is checkpointed) and its update rule.

    An overflowing step divides the scale by ``factor`` (never below 1); ``window`` clean steps
    in a row multiply it by ``factor``.  With ``loss_scale: none`` the scale stays 1.
    """

    def __init__(self, train: TrainConfig):
        super().__init__()
        self.dynamic = train.loss_scale == "dynamic"
        initial = train.initial_loss_scale if self.dynamic else 1.0
        self.scale = Parameter(Tensor(initial, ms.float32), name="loss_scale", requires_grad=False)
        self.clean_steps = Parameter(Tensor(0, ms.int32), name="loss_scale_clean_steps", requires_grad=False)
        self.factor = train.loss_scale_factor
        self.window = train.loss_scale_window

    def update(self, finite):
        if self.dynamic:
            clean = ops.select(finite, self.clean_steps + 1, ops.zeros_like(self.clean_steps))
            grow = clean >= self.window
            scale = ops.select(finite, ops.select(grow, self.scale * self.factor, self.scale),
                               ops.maximum(self.scale / self.factor, 1.0))
            ops.assign(self.scale, scale)
            ops.assign(self.clean_steps, ops.select(grow, ops.zeros_like(clean), clean))
        return finite


class ForwardBackward(nn.Cell):
    """Loss statistics and scaled gradients for one micro-batch, summed over the ranks that hold the same
    slice of each parameter (``grad_reducer``: ``parallel/gradients.py``; None in one process)."""

    def __init__(self, loss_cell: nn.Cell, weights, grad_reducer: Optional[nn.Cell] = None):
        super().__init__(auto_prefix=False)
        self.loss_cell = loss_cell
        self.value_and_grad = ops.value_and_grad(loss_cell, None, weights, has_aux=True)
        self.grad_reducer = grad_reducer

    def construct(self, tokens, domain_ids, loss_scale, token_total, expert_plan=None, dropout_seed=None):
        outputs, grads = self.value_and_grad(tokens, domain_ids, loss_scale, token_total, expert_plan, dropout_seed)
        if self.grad_reducer is not None:
            grads = self.grad_reducer(grads)
        return outputs[1:], grads


class ApplyGradients(nn.Cell):
    """Unscale, check for inf/nan, clip by global norm, update (skipped on overflow), adjust scale.

    ``host_updated``: parameters whose gradients follow the optimizer's in ``grads`` and are
    updated elsewhere (the ECSS slab, ``ecss/``): they count in the clip and the overflow check,
    and their gradients are returned as they came (still scaled: the host multiplies them by the
    factor inside its update) after the finite flag, the factor and the norm.
    ``host_squares`` adds gradients summed on the host (see :func:`unscale_and_clip`).
    ``norm``: over several ranks, the global norm's weights and world sum (``parallel/gradients.py``).
    """

    def __init__(self, optimizer: nn.Optimizer, loss_scale: DynamicLossScale, grad_clip_norm: float,
                 host_updated: Sequence[Parameter] = (), norm: Optional[GlobalNorm] = None):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.loss_scale = loss_scale
        self.grad_clip_norm = grad_clip_norm
        self.host_updated = tuple(host_updated)
        self.device_count = len(optimizer.parameters)
        self.norm_weights = None if norm is None else norm.weights
        self.world_sum = None if norm is None else norm.world_sum
        self.host_weight = 1.0 if norm is None else norm.host_weight

    def construct(self, grads, host_squares=None):
        if host_squares is not None:
            host_squares = host_squares * self.host_weight
        clipped, finite, factor, norm = unscale_and_clip(grads, 1.0 / self.loss_scale.scale, self.grad_clip_norm,
                                                         host_squares, self.norm_weights, self.world_sum,
                                                         self.device_count)
        if finite:
            self.optimizer(clipped)
        return (self.loss_scale.update(finite), factor, norm) + grads[self.device_count:]


class TrainOneStepCell(nn.Cell):
    """One fused step: returns (nll/domain, tokens/domain, aux, dropped, finite, loss scale used,
    clip factor, gradient norm, host-updated gradients...)."""

    def __init__(self, forward_backward: ForwardBackward, apply_gradients: ApplyGradients):
        super().__init__(auto_prefix=False)
        self.forward_backward = forward_backward
        self.apply_gradients = apply_gradients

    def construct(self, tokens, domain_ids, token_total, expert_plan=None, dropout_seed=None):
        scale = self.apply_gradients.loss_scale.scale * 1.0
        stats, grads = self.forward_backward(tokens, domain_ids, scale, token_total, expert_plan, dropout_seed)
        applied = self.apply_gradients(grads)
        return stats + (applied[0], scale) + applied[1:]


def declare_dynamic_plan(step_cell: TrainOneStepCell, rows: int, seq_length: int, sparse_layers: int,
                         dropout: bool) -> None:
    """Declare the RRE plan's slot and row counts dynamic, so one graph serves every batch.

    Without this every new plan size would compile a graph (15-70 s each), and each compiled
    graph keeps its own memory.  Both entry points are declared: the fused step and the
    forward/backward that gradient accumulation calls on its own.
    """
    tokens = Tensor(shape=[rows, seq_length + 1], dtype=ms.int32)
    domains = Tensor(shape=[rows], dtype=ms.int32)
    scalar = Tensor(shape=[], dtype=ms.float32)
    plan = Tensor(shape=[sparse_layers, None, None], dtype=ms.int32)
    seed = (Tensor(shape=[], dtype=ms.int64),) if dropout else ()
    step_cell.set_inputs(tokens, domains, scalar, plan, *seed)
    step_cell.forward_backward.set_inputs(tokens, domains, scalar, scalar, plan, *seed)


class SlabReloads(Protocol):
    """ECSS's hooks for a step whose micro-batches need more than one slab load (``ecss/offload.py``)."""

    zero_grads: Tuple[Tensor, ...]  # zeros in the slab's shapes: the host already holds those gradients

    def before(self, micro: int) -> None:
        """Load the slab if micro-batch ``micro`` starts a load."""

    def ends_load(self, micro: int) -> bool:
        """Whether the slab is reloaded after micro-batch ``micro``."""

    def take(self, slab_grads: Tuple[Tensor, ...]) -> None:
        """Bring the load's summed slab gradients to the host."""

    def host_squares(self) -> Tensor:
        """The sum of squares of every expert gradient the host summed (float32 scalar)."""


@dataclass
class StepResult:
    """One step as reported: statistics summed over micro-batches and data-parallel ranks."""

    loss: float
    nll: np.ndarray
    counted: np.ndarray
    aux_loss: float
    dropped: int
    finite: bool
    loss_scale: float
    clip_factor: float = 1.0  # unscale times clip, as applied to every gradient of the step
    grad_norm: float = 0.0  # the global norm of the unscaled gradients, before clipping
    host_grads: Tuple[Tensor, ...] = ()  # ApplyGradients.host_updated's gradients, on the device: x clip_factor


def run_step(step_cell: TrainOneStepCell, micro_batches: Sequence[Tuple], token_total: int, aux_loss_coef: float,
             parts: int, reloads: Optional[SlabReloads] = None) -> StepResult:
    """One update from this rank's micro-batches (see ``training/global_batch.py``).

    With several micro-batches the scaled gradients are summed in micro-batch order, then
    applied once: each micro-batch's loss is already divided by the step's token total, so
    the sum is the gradient of the global-batch mean.  The reported loss is computed here, in
    float64, from the summed per-domain NLL, so every way of splitting a batch reports it alike.
    ``reloads``: the ECSS slab changes between micro-batches; each load's slab gradients go to
    the host, which sums them and adds their squares to the clip and the overflow check.
    """
    if len(micro_batches) == 1 and reloads is None:
        outputs = step_cell(*micro_batches[0])
    else:
        scale = step_cell.apply_gradients.loss_scale.scale * 1.0
        dense_count = step_cell.apply_gradients.device_count
        dense_sum, slab_sum, totals = None, None, None
        for micro, (tokens, domain_ids, *rest) in enumerate(micro_batches):
            if reloads is not None:
                reloads.before(micro)
            stats, grads = step_cell.forward_backward(tokens, domain_ids, scale, *rest)
            dense_sum = _add(dense_sum, grads[:dense_count])
            slab_sum = _add(slab_sum, grads[dense_count:])
            if reloads is not None and reloads.ends_load(micro):
                reloads.take(slab_sum)
                slab_sum = None
            stats = [s.asnumpy() for s in stats]
            totals = stats if totals is None else [a + b for a, b in zip(totals, stats)]
        if reloads is None:
            applied = step_cell.apply_gradients(dense_sum + slab_sum)
        else:
            applied = step_cell.apply_gradients(dense_sum + reloads.zero_grads, reloads.host_squares())
        outputs = totals + [applied[0], scale] + list(applied[1:])
    nll, counted, aux_sum, dropped, finite, scale, factor, norm = (
        np.asarray(o.asnumpy() if isinstance(o, Tensor) else o) for o in outputs[:8])
    aux_loss = float(aux_sum) / parts
    loss = float(np.sum(nll, dtype=np.float64)) / max(token_total, 1) + aux_loss_coef * aux_loss
    return StepResult(loss, nll, counted, aux_loss, int(dropped), bool(finite), float(scale), float(factor),
                      float(norm), tuple(outputs[8:]))


def _add(total: Optional[Tuple[Tensor, ...]], grads: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
    return grads if total is None else tuple(a + b for a, b in zip(total, grads))
