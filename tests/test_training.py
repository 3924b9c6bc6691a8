"""The training runner: optimizer math, overflow skip, accumulation, checkpoints and crash-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
import yaml
from mindspore import Parameter, Tensor, nn

from mindformers_sigma.checkpoint import files as ckpt
from mindformers_sigma.model.names import expert_tensor_names
from mindformers_sigma.training.global_batch import predicted_tokens
from mindformers_sigma.training.lr_schedule import learning_rate_at
from mindformers_sigma.training.optimizer import HybridAdamWeightDecay
from mindformers_sigma.training.train_step import run_step, unscale_and_clip
from mindformers_sigma.training.trainer import build_train_step

from conftest import (EOD, REAL_VOCAB, REPO, assert_close_to_scale, micro_config, real_batch, stop_after_checkpoint,
                      tiny_raw, train_cmd)


class _Two(nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense = Parameter(Tensor(np.array([[0.5, -1.0]], np.float32)), name="layer.query.weight")
        self.expert = Parameter(Tensor(np.array([[2.0, 0.25]], np.float32)), name=expert_tensor_names("layer")[0])
        self.bias = Parameter(Tensor(np.array([0.1, 0.2], np.float32)), name="layer.query.bias")


def test_hybrid_adam_matches_numpy_with_separate_expert_epsilon(pynative):
    cell = _Two()
    params = cell.trainable_params()
    start = [p.asnumpy().copy() for p in params]
    lrs = [0.1, 0.05]
    opt = HybridAdamWeightDecay(params, lrs, beta1=0.9, beta2=0.95, eps=1e-3, expert_eps=1e-20, weight_decay=0.1)
    grads = [np.array([[1e-6, -2.0]], np.float32), np.array([[3e-9, 0.0]], np.float32), np.array([0.5, -0.5], np.float32)]
    m = [np.zeros_like(g) for g in grads]
    v = [np.zeros_like(g) for g in grads]
    expected = [s.astype(np.float64) for s in start]
    for step in range(2):
        opt(tuple(Tensor(g) for g in grads))
        for i, (name, g) in enumerate(zip(["dense", "expert", "bias"], grads)):
            eps = 1e-20 if name == "expert" else 1e-3
            decay = 0.0 if name == "bias" else 0.1
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.95 * v[i] + 0.05 * g * g
            expected[i] = expected[i] - lrs[step] * (m[i] / (np.sqrt(v[i]) + eps) + decay * expected[i])
    for param, want in zip(params, expected):
        np.testing.assert_allclose(param.asnumpy(), want, rtol=1e-5, atol=1e-7)
    # The tiny expert gradient moves its weight by about lr, the dense one with eps=1e-3 barely.
    assert abs(params[1].asnumpy()[0, 0] - start[1][0, 0]) > 0.1
    assert int(opt.global_step.asnumpy()) == 2


def _batch(config, batch=4, seed=0):
    """Random tokens with EOD inside (ids 0..V-1 include 6), one domain per row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.model.vocab_size, (batch, config.model.seq_length + 1)).astype(np.int32)
    tokens[:, 5] = EOD
    return tokens, (np.arange(batch) % config.moe.num_domains).astype(np.int32)


def _step_inputs(tokens, domains):
    """Inputs of the fused step: tokens, domains and the step's predicted-token count."""
    total = predicted_tokens(tokens, EOD)
    return Tensor(tokens), Tensor(domains), Tensor(float(total), ms.float32)


def test_inf_gradient_skips_the_update_and_lowers_the_scale(pynative):
    config = micro_config(train={"loss_scale": "dynamic", "initial_loss_scale": 1024.0, "loss_scale_window": 2})
    step = build_train_step(config, None)
    weights = step.apply_gradients.optimizer.parameters
    before = [w.asnumpy().copy() for w in weights]
    poisoned = [np.zeros(w.shape, np.float32) for w in weights]
    poisoned[3][0] = np.inf  # one inf entry in one gradient
    finite = step.apply_gradients(tuple(Tensor(g) for g in poisoned))[0]
    assert not bool(finite.asnumpy())
    for w, b in zip(weights, before):
        np.testing.assert_array_equal(w.asnumpy(), b)
    assert float(step.apply_gradients.loss_scale.scale.asnumpy()) == 512.0
    assert int(step.apply_gradients.optimizer.global_step.asnumpy()) == 0
    # Clean steps: the update happens, and after `window` of them the scale grows again.
    tokens, domains = _batch(config)
    for _ in range(2):
        out = step(*_step_inputs(tokens, domains))
        assert bool(out[4].asnumpy())
    assert float(step.apply_gradients.loss_scale.scale.asnumpy()) == 1024.0
    assert any(not np.array_equal(w.asnumpy(), b) for w, b in zip(weights, before))


class _UnscaleAndClip(nn.Cell):
    def __init__(self, clip_norm):
        super().__init__()
        self.clip_norm = clip_norm

    def construct(self, grads, inverse_scale, extra_squares=None):
        return unscale_and_clip(grads, inverse_scale, self.clip_norm, extra_squares)


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_unscale_and_clip_matches_numpy_and_flags_inf_and_nan(mode):
    ms.set_context(mode=mode)
    rng = np.random.default_rng(3)
    scale = 1024.0
    grads = [rng.standard_normal(shape).astype(np.float32) * scale for shape in ((4, 8, 16), (8, 16), (16,))]
    true = [g.astype(np.float64) / scale for g in grads]
    norm = np.sqrt(sum(float((t * t).sum()) for t in true))
    # Gradients held elsewhere (ECSS's host sums) count through their (scaled) sum of squares.
    host = rng.standard_normal((5, 7)) * scale
    host_norm = np.sqrt(norm ** 2 + float(np.square(host / scale).sum()))
    for clip, extra, total in ((0.0, None, norm), (norm / 3, None, norm), (norm * 2, None, norm),
                               (norm / 3, float(np.square(host).sum()), host_norm)):  # off, binding, not, host
        extra_squares = () if extra is None else (Tensor(np.float32(extra)),)
        out, finite, applied, unclipped = _UnscaleAndClip(clip)(tuple(Tensor(g) for g in grads), Tensor(1.0 / scale, ms.float32),
                                                     *extra_squares)
        factor = min(1.0, clip / total) if clip else 1.0
        assert bool(finite.asnumpy())
        # float32 rounding of the scaled values, the product and the norm's sum: a few eps.
        np.testing.assert_allclose(float(applied.asnumpy()), factor / scale, rtol=1e-5)
        np.testing.assert_allclose(float(unclipped.asnumpy()), total, rtol=1e-5)
        for got, want in zip(out, true):
            np.testing.assert_allclose(got.asnumpy(), want * factor, rtol=1e-5, atol=0)
    for poison in (np.inf, -np.inf, np.nan):
        bad = [g.copy() for g in grads]
        bad[1][3, 5] = poison
        _, finite, _, _ = _UnscaleAndClip(1.0)(tuple(Tensor(g) for g in bad), Tensor(1.0 / scale, ms.float32))
        assert not bool(finite.asnumpy()), poison
        _, finite, _, _ = _UnscaleAndClip(1.0)(tuple(Tensor(g) for g in grads), Tensor(1.0 / scale, ms.float32),
                                            Tensor(np.float32(poison)))  # a host gradient's inf or nan
        assert not bool(finite.asnumpy()), poison
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_overflowing_loss_scale_is_skipped_then_recovers(pynative):
    config = micro_config(train={"loss_scale": "dynamic", "initial_loss_scale": 2.0 ** 127})
    step = build_train_step(config, None)
    tokens, domains = _batch(config)
    finites = [bool(step(*_step_inputs(tokens, domains))[4].asnumpy()) for _ in range(3)]
    assert finites[0] is False  # loss * 2^127 overflows float32
    assert float(step.apply_gradients.loss_scale.scale.asnumpy()) < 2.0 ** 127


def _gradients(step, tokens, domains, total):
    stats, grads = step.forward_backward(Tensor(tokens), Tensor(domains), Tensor(1.0, ms.float32),
                                         Tensor(float(total), ms.float32))
    return [s.asnumpy() for s in stats], [g.asnumpy().astype(np.float64) for g in grads]


def test_accumulated_gradients_equal_the_whole_batch_on_real_text_with_eod(pynative, real_corpus):
    corpus, _ = real_corpus
    config = micro_config(model={"vocab_size": REAL_VOCAB})
    tokens, domains = real_batch(corpus, rows_per_domain=(2, 1, 1), offset=3)
    counts = [predicted_tokens(tokens[:2], EOD), predicted_tokens(tokens[2:], EOD)]
    assert counts[0] != counts[1], "the micro-batches must hold different numbers of predicted tokens"
    total = sum(counts)
    step = build_train_step(config, None)
    whole_stats, whole = _gradients(step, tokens, domains, total)
    first_stats, first = _gradients(step, tokens[:2], domains[:2], total)
    second_stats, second = _gradients(step, tokens[2:], domains[2:], total)
    accumulated = [a + b for a, b in zip(first, second)]
    # float32 sums in another order: equal to rounding relative to the size of the terms.
    assert_close_to_scale(accumulated, whole, rel=1e-5, what="accumulated gradient")
    np.testing.assert_array_equal(first_stats[1] + second_stats[1], whole_stats[1])  # token counts
    # NLL per domain: a float32 sum of about 60 terms in another order is within 60 eps (7e-6) of it.
    np.testing.assert_allclose(first_stats[0] + second_stats[0], whole_stats[0], rtol=2e-5)
    # Normalising each micro-batch by its own count (the old rule) is measurably different.
    per_micro_mean = [(a * total / counts[0] + b * total / counts[1]) / 2 for a, b in zip(first, second)]
    with pytest.raises(AssertionError):
        assert_close_to_scale(per_micro_mean, whole, rel=1e-3)


def test_trainer_step_reports_the_same_loss_however_the_batch_is_split(pynative, real_corpus):
    corpus, _ = real_corpus
    config = micro_config(model={"vocab_size": REAL_VOCAB})
    tokens, domains = real_batch(corpus, rows_per_domain=(1, 2, 1), offset=5)
    total = predicted_tokens(tokens, EOD)
    ms.set_seed(0)
    whole = run_step(build_train_step(config, None), [_step_inputs(tokens, domains)], total, 0.0, 1)
    ms.set_seed(0)
    split_cell = build_train_step(config, None)
    parts = [_step_inputs(tokens[i:i + 1], domains[i:i + 1])[:2] + (Tensor(float(total), ms.float32),)
             for i in range(4)]
    split = run_step(split_cell, parts, total, 0.0, 4)
    assert split.loss == pytest.approx(whole.loss, rel=2e-5)  # float32 sums in another order (see above)
    np.testing.assert_array_equal(split.counted, whole.counted)
    assert whole.counted.sum() == total


def _params(directory, step, fmt="ckpt"):
    info = ckpt.read_checkpoint(os.path.join(directory, f"step_{step:08d}.json"))
    return {k: v.asnumpy() for k, v in ckpt.load_parameters(info).items()}


def test_truncated_newest_checkpoint_falls_back_to_previous(pynative, tmp_path):
    params = {"w": Parameter(Tensor(np.arange(1000, dtype=np.float32)), name="w")}
    for step in (1, 2, 3):
        params["w"].set_data(Tensor(np.full(1000, step, np.float32)))
        ckpt.save_checkpoint(str(tmp_path), step, params, {"data_position": step * 8}, "safetensors", keep=2)
    assert ckpt.list_checkpoints(str(tmp_path)) == [2, 3]
    assert sorted(os.listdir(tmp_path)) == ["step_00000002.json", "step_00000002.safetensors",
                                            "step_00000003.json", "step_00000003.safetensors"]
    newest = tmp_path / "step_00000003.safetensors"
    newest.write_bytes(newest.read_bytes()[:200])
    lines = []
    info = ckpt.find_resume_checkpoint(str(tmp_path), lines.append)
    assert info.step == 2 and info.data_position == 16
    assert len(lines) == 1 and "step 3" in lines[0] and "truncated or corrupt" in lines[0]
    assert np.all(ckpt.load_parameters(info)["w"].asnumpy() == 2)


def _write_config(tmp_path, dropout=0.0, **train):
    raw = tiny_raw()
    raw["model"].update(vocab_size=64, hidden_size=32, num_heads=4, ffn_hidden_size=48, num_layers=3,
                        dense_layers=1, sparse_layers=2, seq_length=16, dropout_rate=dropout)
    raw["train"].update(batch_size=4, steps=12, warmup_steps=2, checkpoint_interval=3, keep_checkpoints=2,
                        peak_flops=1.0e11, log_interval=1, **train)
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        return [json.loads(line)["loss"] for line in handle]


@pytest.mark.slow
def test_killed_then_interrupted_then_resumed_gives_the_same_run_with_dropout(tmp_path):
    # Dropout on: its masks are a function of (seed, step, micro-batch), so a resumed run draws the
    # very masks the uninterrupted one drew.  (The .ckpt format is resumed in test_run_folder.py.)
    config = _write_config(tmp_path, dropout=0.1, checkpoint_format="safetensors", grad_accumulation_steps=2)
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    subprocess.run(train_cmd(config, straight), check=True, capture_output=True, cwd=REPO)
    first, _, _ = stop_after_checkpoint(config, crashed, 3)
    # Ctrl-C: the step in flight finishes, a checkpoint of it is saved, one line, exit 130 (143 when
    # the signal lands inside a running graph: MindSpore's own handler re-raises it as SIGTERM).
    second, code, stderr = stop_after_checkpoint(config, crashed, first + 3, ("--resume", "auto"), signal.SIGINT)
    assert code in (130, 143) and len(stderr.strip().splitlines()) == 1, stderr[-1500:]
    assert f"after step {second}: checkpoint saved" in stderr and "--resume auto" in stderr
    assert 3 <= first < second < 12, "both stops must land partway"
    result = subprocess.run(train_cmd(config, crashed, "--resume", "auto"), capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"continuing from step {second}" in result.stdout
    assert _losses(crashed) == _losses(straight)  # bitwise: the same float values
    a = _params(straight / "checkpoints", 12)
    b = _params(crashed / "checkpoints", 12)
    assert a.keys() == b.keys() and any(k.startswith("adam_m.") for k in a)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_dropout_is_active_in_training_and_off_without_a_seed(pynative):
    from mindformers_sigma.model.dropout import SeededDropout

    rate = 0.25
    dropout = SeededDropout(rate, site=3)
    x = Tensor(np.ones((64, 128), np.float32))
    assert np.array_equal(dropout(x).asnumpy(), x.asnumpy())
    masked = dropout(x, Tensor(11, ms.int64)).asnumpy()
    kept = masked != 0
    assert np.allclose(masked[kept], 1.0 / (1.0 - rate))
    n = kept.size
    assert abs((~kept).mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)  # the drop rate is the configured one
    again = dropout(x, Tensor(11, ms.int64)).asnumpy()
    other_seed = dropout(x, Tensor(12, ms.int64)).asnumpy()
    other_site = SeededDropout(rate, site=4)(x, Tensor(11, ms.int64)).asnumpy()
    assert np.array_equal(again, masked)
    assert (other_seed != masked).mean() > 0.2 and (other_site != masked).mean() > 0.2
    # In the whole model: a step seed changes the statistics, no seed (evaluation) leaves them alone.
    from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM

    net = PanGuSigmaForCausalLM(micro_config(model={"dropout_rate": 0.3}))
    tokens, domains = _batch(micro_config())
    plain = [net(Tensor(tokens), Tensor(domains))[0].asnumpy() for _ in range(2)]
    seeded = net(Tensor(tokens), Tensor(domains), None, Tensor(5, ms.int64))[0].asnumpy()
    assert np.array_equal(plain[0], plain[1]) and not np.allclose(seeded, plain[0])


def test_cli_training_errors_are_one_line(tmp_path):
    config = _write_config(tmp_path)
    cases = [
        (["--resume", "auto"], "needs --out"),
        (["--set", "train.batch_size=0"], "train.batch_size = 0"),
        (["--set", "model.hiden_size=5"], "did you mean 'hidden_size'"),
        (["--set", "nodot"], "expected SECTION.KEY=VALUE"),
        (["--steps", "0"], "--steps"),
        (["--data", str(tmp_path / "nowhere")], "manifest.json: not found"),
        (["--set", "model.vocab_size=1000000000000"], "GiB is available; the largest part is model.vocab_size"),
        (["--set", "train.learning_rate=.inf"], "train.learning_rate = inf: must be a finite number"),
        (["--out", ""], "an empty path"),
        (["--data", str(tmp_path / "two\nlines")], "two\\nlines"),
    ]
    for extra, message in cases:
        cmd = [sys.executable, "-m", "mindformers_sigma", "train", "--config", str(config), *extra]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 2, (extra, result.stderr[-500:])
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and message in errors[0], (extra, result.stderr[-500:])
        assert "Traceback" not in result.stderr


def test_a_step_whose_inputs_are_all_eod_is_harmless(pynative):
    # The tail of a domain is EOD fill: a batch can hold no predicted token at all.
    config = micro_config()
    step = build_train_step(config, None)
    before = [w.asnumpy().copy() for w in step.apply_gradients.optimizer.parameters]
    tokens = np.full((4, config.model.seq_length + 1), EOD, np.int32)
    domains = np.arange(4, dtype=np.int32)
    result = run_step(step, [_step_inputs(tokens, domains)], predicted_tokens(tokens, EOD), 0.0, 1)
    assert result.loss == 0.0 and result.finite and result.counted.sum() == 0
    after = [w.asnumpy() for w in step.apply_gradients.optimizer.parameters]
    assert all(np.isfinite(a).all() for a in after)
    moved = [np.abs(a - b).max() for a, b in zip(after, before)]
    lr = learning_rate_at(0, config.train)  # zero gradients: only weight decay may move a weight
    assert max(moved) <= lr * config.train.weight_decay * max(np.abs(b).max() for b in before) * 1.01 + 1e-12


def test_a_rank_stops_with_the_signal_it_got_or_143_when_a_peer_got_it():
    import signal

    from mindformers_sigma.context import ParallelInfo
    from mindformers_sigma.errors import Interrupted
    from mindformers_sigma.training.interrupts import StopRequests

    assert ParallelInfo().any_rank(True) is True and ParallelInfo().any_rank(False) is False
    requests = StopRequests()
    for signum, code, words in [(None, 143, "another rank received a stop signal"),
                                (signal.SIGINT, 130, "stopped by SIGINT"), (signal.SIGTERM, 143, "stopped by SIGTERM")]:
        requests.signum = signum
        with pytest.raises(Interrupted) as stopped:
            requests.raise_now("after step 3")
        assert stopped.value.exit_code == code and words in str(stopped.value)


def test_a_checkpoint_mindspore_cannot_parse_is_one_error_line(tmp_path):
    # Its sha256 matches its sidecar (written unreadable, or the sidecar rewritten): the trainer
    # must still say which file and what to do, not raise MindSpore's own error.
    from mindformers_sigma.checksum import file_sha256
    from mindformers_sigma.errors import DataError
    from mindformers_sigma.training.trainer import train

    config = micro_config(train={"batch_size": 4, "peak_flops": 1e11})
    train(config, steps=1, out_dir=str(tmp_path / "run"))
    weights = tmp_path / "run" / "checkpoints" / "step_00000001.ckpt"
    weights.write_bytes(b"\x08\x01" + b"not a checkpoint" * 64)
    sidecar = weights.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(meta, sha256=file_sha256(str(weights)))))
    with pytest.raises(DataError, match=r"step_00000001.ckpt: cannot be read as a ckpt checkpoint"):
        train(config, steps=2, out_dir=str(tmp_path / "run"), resume="auto")
