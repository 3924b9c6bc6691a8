"""The training runner: optimizer math, overflow skip, accumulation, checkpoints and crash-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mindspore as ms
import numpy as np
import pytest
import yaml
from mindspore import Parameter, Tensor, nn

from mindformers_sigma.training import checkpoint as ckpt
from mindformers_sigma.training.optimizer import HybridAdamWeightDecay
from mindformers_sigma.training.trainer import build_train_step

from conftest import REPO, micro_config, tiny_raw


class _Two(nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense = Parameter(Tensor(np.array([[0.5, -1.0]], np.float32)), name="layer.query.weight")
        self.expert = Parameter(Tensor(np.array([[2.0, 0.25]], np.float32)), name="layer.experts.w1")
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
    rng = np.random.default_rng(seed)
    tokens = rng.integers(7, config.model.vocab_size, (batch, config.model.seq_length + 1)).astype(np.int32)
    return tokens, (np.arange(batch) % config.moe.num_domains).astype(np.int32)


def test_inf_gradient_skips_the_update_and_lowers_the_scale(pynative):
    config = micro_config(train={"loss_scale": "dynamic", "initial_loss_scale": 1024.0, "loss_scale_window": 2})
    step = build_train_step(config, None, 1)
    weights = step.apply_gradients.optimizer.parameters
    before = [w.asnumpy().copy() for w in weights]
    poisoned = [np.zeros(w.shape, np.float32) for w in weights]
    poisoned[3][0] = np.inf  # one inf entry in one gradient
    finite = step.apply_gradients(tuple(Tensor(g) for g in poisoned), Tensor(1.0, ms.float32))
    assert not bool(finite.asnumpy())
    for w, b in zip(weights, before):
        np.testing.assert_array_equal(w.asnumpy(), b)
    assert float(step.apply_gradients.loss_scale.scale.asnumpy()) == 512.0
    assert int(step.apply_gradients.optimizer.global_step.asnumpy()) == 0
    # Clean steps: the update happens, and after `window` of them the scale grows again.
    tokens, domains = _batch(config)
    for _ in range(2):
        out = step(Tensor(tokens), Tensor(domains))
        assert bool(out[5].asnumpy())
    assert float(step.apply_gradients.loss_scale.scale.asnumpy()) == 1024.0
    assert any(not np.array_equal(w.asnumpy(), b) for w, b in zip(weights, before))


def test_overflowing_loss_scale_is_skipped_then_recovers(pynative):
    config = micro_config(train={"loss_scale": "dynamic", "initial_loss_scale": 2.0 ** 127})
    step = build_train_step(config, None, 1)
    tokens, domains = _batch(config)
    finites = [bool(step(Tensor(tokens), Tensor(domains))[5].asnumpy()) for _ in range(3)]
    assert finites[0] is False  # loss * 2^127 overflows float32
    assert float(step.apply_gradients.loss_scale.scale.asnumpy()) < 2.0 ** 127


def test_gradient_accumulation_equals_one_big_batch(pynative):
    from mindformers_sigma.training.trainer import _accumulated_step

    config = micro_config(train={"learning_rate": 1.0e-2, "warmup_steps": 0})
    tokens, domains = _batch(config, batch=4)  # no EOD: every micro-batch counts the same tokens
    ms.set_seed(0)
    whole = build_train_step(config, None, 1)
    ms.set_seed(0)
    split = build_train_step(config, None, 1)
    whole_loss = float(whole(Tensor(tokens), Tensor(domains))[0].asnumpy())
    micro = [(Tensor(tokens[:2]), Tensor(domains[:2])), (Tensor(tokens[2:]), Tensor(domains[2:]))]
    split_loss = float(_accumulated_step(split, micro)[0].asnumpy())
    assert split_loss == pytest.approx(whole_loss, abs=1e-6)
    for a, b in zip(whole.apply_gradients.optimizer.parameters, split.apply_gradients.optimizer.parameters):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), atol=1e-6)


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


def _write_config(tmp_path, **train):
    raw = tiny_raw()
    raw["model"].update(vocab_size=64, hidden_size=32, num_heads=4, ffn_hidden_size=48, num_layers=3,
                        dense_layers=1, sparse_layers=2, seq_length=16)
    raw["train"].update(batch_size=4, steps=12, warmup_steps=2, checkpoint_interval=3, keep_checkpoints=2,
                        peak_flops=1.0e11, log_interval=1, **train)
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train_cmd(config, out, *extra):
    return [sys.executable, "-m", "mindformers_sigma", "train", "--config", str(config), "--out", str(out), *extra]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        return [json.loads(line)["loss"] for line in handle]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_sigkill_then_resume_gives_the_same_run(tmp_path, fmt):
    config = _write_config(tmp_path, checkpoint_format=fmt)
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    subprocess.run(_train_cmd(config, straight), check=True, capture_output=True, cwd=REPO)
    process = subprocess.Popen(_train_cmd(config, crashed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and ckpt.list_checkpoints(str(crashed / "checkpoints"))[-1:] < [6]:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped_at = ckpt.list_checkpoints(str(crashed / "checkpoints"))[-1]
    assert 6 <= stopped_at < 12, "the kill must land partway"
    result = subprocess.run(_train_cmd(config, crashed, "--resume", "auto"), capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"continuing from step {stopped_at}" in result.stdout
    assert _losses(crashed) == _losses(straight)  # bitwise: the same float values
    a = _params(straight / "checkpoints", 12)
    b = _params(crashed / "checkpoints", 12)
    assert a.keys() == b.keys() and any(k.startswith("adam_m.") for k in a)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_cli_training_errors_are_one_line(tmp_path):
    config = _write_config(tmp_path)
    cases = [
        (["--resume", "auto"], "needs --out"),
        (["--set", "train.batch_size=0"], "train.batch_size = 0"),
        (["--set", "model.hiden_size=5"], "did you mean 'hidden_size'"),
        (["--set", "nodot"], "expected SECTION.KEY=VALUE"),
        (["--steps", "0"], "--steps"),
        (["--data", str(tmp_path / "nowhere")], "manifest.json: not found"),
    ]
    for extra, message in cases:
        cmd = [sys.executable, "-m", "mindformers_sigma", "train", "--config", str(config), *extra]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 2, (extra, result.stderr[-500:])
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and message in errors[0], (extra, result.stderr[-500:])
        assert "Traceback" not in result.stderr
