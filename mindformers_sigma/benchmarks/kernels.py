"""``pangu-sigma bench kernels``: every op of the T1 training step, in each candidate formulation, timed
alone at the T1 shapes.

GRAPH mode, fp32, one compiled Cell per (op, formulation); forward alone and forward + backward
(gradients of the output's sum with respect to every float input).  Each formulation's forward
output is compared with the baseline's (``max_rel_diff``), so a faster formulation that computes
something else is visible at once.  ``baseline`` marks what the model used before this benchmark
existed; docs/benchmarks.md says what it uses now.
T1 shapes: 8 x 256 tokens, hidden 256, 4 heads, FFN 1024, vocabulary 8000, 16 experts.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from mindformers_sigma.benchmarks.record import check_out_dir, markdown_table, write_record
from mindformers_sigma.native.layer_norm import native_layer_norm

TOKENS, HIDDEN, HEADS, FFN, VOCAB, SEQ, EXPERTS, CAPACITY = 2048, 256, 4, 1024, 8000, 256, 16, 256
EPS = 1e-5


class Fn(nn.Cell):
    """A formulation as a Cell: ``fn(*float_inputs)``; integer tensors it needs are constants."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def construct(self, *inputs):
        return self.fn(*inputs)


class ForwardBackward(nn.Cell):
    """The output and the gradients of its sum w.r.t. every input: returning the output keeps the
    forward pass in the graph (a gradient that does not need it would otherwise drop it)."""

    def __init__(self, cell: nn.Cell):
        super().__init__()
        self.cell = cell
        self.grad = ops.GradOperation(get_all=True)

    def construct(self, *inputs):
        return self.cell(*inputs), self.grad(self.cell)(*inputs)


@dataclass
class Case:
    op: str
    formulation: str
    fn: Callable
    inputs: Tuple[np.ndarray, ...]
    baseline: bool = False  # what the model used before this benchmark existed: ratios are against it
    backward: bool = True


def _rand(*shape, scale=1.0, seed=0):
    return (np.random.default_rng(seed + len(shape)).standard_normal(shape) * scale).astype(np.float32)


def _layer_norm_composed(x, gamma, beta):
    mean = x.mean(-1, keep_dims=True)
    centred = x - mean
    variance = (centred * centred).mean(-1, keep_dims=True)
    return centred * ops.rsqrt(variance + EPS) * gamma + beta


def _layer_norm_corrected(x, gamma, beta):
    """As above with the mean corrected by a second pass: float32 means of rows with a large
    offset lose digits (error 9e-5 against float64 at mean 1000; corrected: 2e-7)."""
    centred = x - x.mean(-1, keep_dims=True)
    centred = centred - centred.mean(-1, keep_dims=True)
    variance = (centred * centred).mean(-1, keep_dims=True)
    return centred * ops.rsqrt(variance + EPS) * gamma + beta


_LAYER_NORM = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=EPS)


def _softmax_composed(x):
    shifted = ops.exp(x - x.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def _dispatch_inputs():
    """Tokens sent to expert slots as the dispatcher does: 2048 tokens over 16 experts x 256 rows."""
    rng = np.random.default_rng(1)
    experts = rng.integers(0, EXPERTS, TOKENS)
    order = np.argsort(experts, kind="stable")
    slots = np.full(TOKENS, EXPERTS * CAPACITY, np.int32)  # the trash slot unless it fits
    position = np.zeros(TOKENS, np.int64)
    for rank, token in enumerate(order):
        position[token] = rank - np.searchsorted(experts[order], experts[token])
    fits = position < CAPACITY
    slots[fits] = (experts * CAPACITY + position)[fits]
    slot_token = np.full(EXPERTS * CAPACITY, TOKENS, np.int32)  # row TOKENS: a zero row
    slot_token[slots[fits]] = np.arange(TOKENS)[fits]
    return Tensor(slots), Tensor(slot_token)


def cases() -> List[Case]:
    x_ffn = _rand(TOKENS, FFN)
    x_hidden, gamma, beta = _rand(TOKENS, HIDDEN), np.ones(HIDDEN, np.float32), np.zeros(HIDDEN, np.float32)
    w_in_out = _rand(HIDDEN, FFN, scale=0.02)
    w_out_in = np.ascontiguousarray(w_in_out.T)  # the same weight stored [out, in]
    grad_out = _rand(TOKENS, FFN)
    scores = _rand(TOKENS // SEQ, HEADS, SEQ, SEQ)
    table = _rand(VOCAB, HIDDEN, scale=0.02)
    logits = _rand(TOKENS, VOCAB)
    labels = Tensor(np.random.default_rng(2).integers(0, VOCAB, (TOKENS, 1)).astype(np.int32))
    buffers, w1, w2 = _rand(EXPERTS, CAPACITY, HIDDEN), _rand(EXPERTS, HIDDEN, FFN, scale=0.02), \
        _rand(EXPERTS, FFN, HIDDEN, scale=0.02)
    expert_grad = _rand(EXPERTS, FFN, HIDDEN)
    slots, slot_token = _dispatch_inputs()
    zero_row = Tensor(np.zeros((1, HIDDEN), np.float32))
    batch_matmul = ops.BatchMatMul()
    matmul_ta, matmul_tb = ops.MatMul(transpose_a=True), ops.MatMul(transpose_b=True)
    sparse_ce = ops.SparseSoftmaxCrossEntropyWithLogits()

    def fast_gelu(x):
        return ops.fast_gelu(x)

    def sigmoid_gelu(x):
        return x * ops.sigmoid(1.702 * x)

    def tanh_gelu(x):
        return ops.gelu(x, approximate="tanh")

    def layer_norm(x, g, b):
        return _LAYER_NORM(x, g, b)[0]

    native = native_layer_norm()
    epsilon = Tensor([EPS], ms.float32)

    def layer_norm_native(x, g, b):
        return native(x, g, b, epsilon)[0]

    def linear(x, w):
        return ops.matmul(x, w)

    def linear_tb(x, w):
        return matmul_tb(x, w)

    def linear_ta(x, g):
        return matmul_ta(x, g)

    def transposed_first_matmul(x, g):
        return ops.matmul(x.transpose(1, 0), g)

    def transposed_second_matmul(g, w):
        return ops.matmul(g, w.transpose(1, 0))

    def softmax(x):
        return ops.softmax(x, -1)

    def nll_log_softmax(z):
        return -ops.gather_elements(ops.log_softmax(z, -1), 1, labels)

    def nll_logsumexp(z):
        return ops.logsumexp(z, -1, True) - ops.gather_elements(z, 1, labels)

    def nll_sparse_ce(z):
        return sparse_ce(z, labels.reshape((-1,)))

    def experts_batched(b, a, c):
        return batch_matmul(ops.fast_gelu(batch_matmul(b, a)), c)

    def experts_loop(b, a, c):
        return ops.stack([ops.matmul(ops.fast_gelu(ops.matmul(b[e], a[e])), c[e]) for e in range(EXPERTS)])

    def sum_of_squares_all_axes(g):
        return (g * g).sum()

    def sum_of_squares_last_axis_first(g):
        return (g * g).reshape((-1, g.shape[-1])).sum(1).sum()

    def finite_all(g):
        return ops.isfinite(g).all().astype(ms.float32)

    def finite_of_sum_of_squares(g):
        return ops.isfinite(sum_of_squares_last_axis_first(g)).astype(ms.float32)

    def unscale_divide(g):
        return g / 1024.0

    def unscale_multiply(g):
        return g * (1.0 / 1024.0)

    def dispatch_segment_sum(h):
        return ops.unsorted_segment_sum(h, slots, EXPERTS * CAPACITY + 1)[:EXPERTS * CAPACITY]

    def dispatch_gather(h):
        return ops.gather(ops.concat((h, zero_row), 0), slot_token, 0)

    def dispatch_scatter_nd(h):
        return ops.scatter_nd(slots.reshape((-1, 1)), h, (EXPERTS * CAPACITY + 1, HIDDEN))[:EXPERTS * CAPACITY]

    return [
        Case("gelu [2048,1024]", "ops.fast_gelu", fast_gelu, (x_ffn,), baseline=True),
        Case("gelu [2048,1024]", "x * sigmoid(1.702 x)", sigmoid_gelu, (x_ffn,)),
        Case("gelu [2048,1024]", "ops.gelu(tanh)", tanh_gelu, (x_ffn,)),
        Case("layernorm [2048,256]", "ops.LayerNorm", layer_norm, (x_hidden, gamma, beta), baseline=True),
        Case("layernorm [2048,256]", "mean/var/rsqrt", _layer_norm_composed, (x_hidden, gamma, beta)),
        Case("layernorm [2048,256]", "mean/var/rsqrt, mean corrected", _layer_norm_corrected, (x_hidden, gamma, beta)),
        *([Case("layernorm [2048,256]", "native C pair (ops.Custom AOT)", layer_norm_native, (x_hidden, gamma, beta))]
          if native is not None else []),
        Case("linear [2048,256]x[256,1024]", "matmul, W [in,out]", linear, (x_hidden, w_in_out), baseline=True),
        Case("linear [2048,256]x[256,1024]", "MatMul(transpose_b), W [out,in]", linear_tb, (x_hidden, w_out_in)),
        Case("weight grad x^T g [256,2048]x[2048,1024]", "MatMul(transpose_a)", linear_ta, (x_hidden, grad_out),
             baseline=True, backward=False),
        Case("weight grad x^T g [256,2048]x[2048,1024]", "transpose, then matmul", transposed_first_matmul,
             (x_hidden, grad_out), backward=False),
        Case("input grad g W^T [2048,1024]x[1024,256]", "MatMul(transpose_b)", linear_tb, (grad_out, w_in_out),
             baseline=True, backward=False),
        Case("input grad g W^T [2048,1024]x[1024,256]", "transpose, then matmul", transposed_second_matmul,
             (grad_out, w_in_out), backward=False),
        Case("tied head [2048,256]x[8000,256]^T", "matmul(x, table.T)", transposed_second_matmul, (x_hidden, table),
             baseline=True),
        Case("tied head [2048,256]x[8000,256]^T", "MatMul(transpose_b)", linear_tb, (x_hidden, table)),
        Case("softmax [8,4,256,256]", "ops.softmax", softmax, (scores,), baseline=True),
        Case("softmax [8,4,256,256]", "exp(x - max) / sum", _softmax_composed, (scores,)),
        Case("token NLL [2048,8000]", "log_softmax + gather_elements", nll_log_softmax, (logits,), baseline=True),
        Case("token NLL [2048,8000]", "logsumexp - gather_elements", nll_logsumexp, (logits,)),
        Case("token NLL [2048,8000]", "SparseSoftmaxCrossEntropyWithLogits (mean)", nll_sparse_ce, (logits,)),
        Case("experts [16,256,256]->1024->256", "BatchMatMul", experts_batched, (buffers, w1, w2), baseline=True),
        Case("experts [16,256,256]->1024->256", "loop of 16 matmuls", experts_loop, (buffers, w1, w2)),
        Case("gradient sum of squares [16,1024,256]", "(g * g).sum() over all axes", sum_of_squares_all_axes,
             (expert_grad,), baseline=True, backward=False),
        Case("gradient sum of squares [16,1024,256]", "last axis first, then the rest",
             sum_of_squares_last_axis_first, (expert_grad,), backward=False),
        Case("gradient finiteness [16,1024,256]", "isfinite(g).all()", finite_all, (expert_grad,), baseline=True,
             backward=False),
        Case("gradient finiteness [16,1024,256]", "isfinite(sum of squares)", finite_of_sum_of_squares,
             (expert_grad,), backward=False),
        Case("gradient unscale [16,1024,256]", "g / scale", unscale_divide, (expert_grad,), baseline=True,
             backward=False),
        Case("gradient unscale [16,1024,256]", "g * (1 / scale)", unscale_multiply, (expert_grad,), backward=False),
        Case("dispatch 2048 tokens -> [16x256, 256]", "unsorted_segment_sum", dispatch_segment_sum, (x_hidden,),
             baseline=True),
        Case("dispatch 2048 tokens -> [16x256, 256]", "gather by slot -> token", dispatch_gather, (x_hidden,)),
        Case("dispatch 2048 tokens -> [16x256, 256]", "scatter_nd", dispatch_scatter_nd, (x_hidden,)),
    ]


def _wait(out) -> None:
    for leaf in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(leaf, (tuple, list)):
            _wait(leaf)
        else:
            leaf.asnumpy()


def time_call(cell: nn.Cell, inputs, seconds: float) -> Tuple[float, float]:
    """(compile + first call s, best-of-3 seconds per call) with about ``seconds`` per round."""
    started = time.perf_counter()
    _wait(cell(*inputs))
    first = time.perf_counter() - started
    started = time.perf_counter()
    _wait(cell(*inputs))
    repeats = max(3, min(200, math.ceil(seconds / max(time.perf_counter() - started, 1e-6))))
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            out = cell(*inputs)
        _wait(out)
        best = min(best, (time.perf_counter() - started) / repeats)
    return first, best


def markdown(rows: List[dict]) -> str:
    """The docs table: each op's formulations, fastest forward + backward first within the op."""
    cells = []
    for op in dict.fromkeys(row["op"] for row in rows):
        group = [row for row in rows if row["op"] == op]
        baseline = next((row for row in group if row["baseline"]), group[0])
        key = "forward_backward_ms" if baseline["forward_backward_ms"] is not None else "forward_ms"
        for row in sorted(group, key=lambda r: r[key]):
            ratio = f"{baseline[key] / row[key]:.2f}x" if not row["baseline"] else "baseline"
            both = "" if row["forward_backward_ms"] is None else f"{row['forward_backward_ms']:.2f}"
            diff = "" if row["max_rel_diff"] is None else f"{row['max_rel_diff']:.1e}"
            cells.append([op, row["formulation"], f"{row['forward_ms']:.2f}", both, ratio, diff])
    return "\n".join(markdown_table(["op", "formulation", "forward ms", "forward + backward ms", "speed-up vs baseline",
                                     "max rel. diff"], cells))


def measure(seconds: float, baselines_only: bool = False) -> List[dict]:
    """One row per (op, formulation) (``baselines_only``: each op's baseline)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    rows, reference = [], {}
    for case in cases():
        if baselines_only and not case.baseline:
            continue
        inputs = [Tensor(a) for a in case.inputs]
        cell = Fn(case.fn)
        output = cell(*inputs).asnumpy()
        if case.baseline:
            reference[case.op] = output
        base = reference.get(case.op)
        if base is not None and output.shape != base.shape:
            base = base.mean()  # a formulation that returns the mean (SparseSoftmaxCrossEntropyWithLogits)
        diff = None if base is None else float(np.abs(output - base).max() / max(np.abs(base).max(), 1e-30))
        compile_forward, forward = time_call(cell, inputs, seconds)
        backward = time_call(ForwardBackward(cell), inputs, seconds) if case.backward else (None, None)
        both = None if backward[1] is None else backward[1] * 1e3
        rows.append({"op": case.op, "formulation": case.formulation, "baseline": case.baseline,
                     "forward_ms": forward * 1e3, "forward_backward_ms": both, "compile_s": compile_forward,
                     "max_rel_diff": diff})
        print(f"{case.op:44s} {case.formulation:42s} fwd {forward * 1e3:8.2f} ms"
              + (f"  fwd+bwd {both:8.2f} ms" if both is not None else "")
              + (f"  diff {diff:.1e}" if diff is not None else "  (baseline)" if case.baseline else ""),
              file=sys.stderr, flush=True)
    return rows


def run(quick: bool, out_dir: str) -> dict:
    """The suite's part: every formulation (quick: each op's baseline, timed briefly)."""
    check_out_dir(out_dir)
    seconds = 0.02 if quick else 0.3
    record = {"benchmark": "kernels", "quick": quick, "shapes": "T1", "seconds_per_round": seconds,
              "rows": measure(seconds, baselines_only=quick)}
    write_record(os.path.join(out_dir, "kernels.json"), record, echo=False)
    return record


def markdown_of(record: dict) -> str:
    return markdown(record["rows"])
