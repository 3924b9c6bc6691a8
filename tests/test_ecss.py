"""ECSS: experts on the host, a slab on the device, a host AdamW (``mindformers_sigma/ecss/``)."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
import yaml
from mindspore import Parameter, Tensor, ops

from mindformers_sigma.config import ConfigError, apply_overrides
from mindformers_sigma.ecss.host_adamw import AdamWSettings, adamw_rows
from mindformers_sigma.ecss.host_store import EXPERT_TENSORS, HostExpertStore
from mindformers_sigma.ecss.offload import ExpertOffload
from mindformers_sigma.ecss.slab import assign_slots, smallest_safe_slab
from mindformers_sigma.errors import DataError
from mindformers_sigma.moe.expert_plan import ExpertPlanner
from mindformers_sigma.training import checkpoint as ckpt
from mindformers_sigma.training.trainer import train

from conftest import REAL_VOCAB, REPO, assert_close_to_scale, micro_config, stop_after_checkpoint, train_cmd


def _real_config(prepared, **train_values):
    config = micro_config(model={"vocab_size": REAL_VOCAB},
                          data={"source": "mindrecord", "path": str(prepared)},
                          train={"batch_size": 4, "warmup_steps": 2, "log_interval": 1, "peak_flops": 1e11,
                                 "checkpoint_interval": 1000, **train_values})
    return config


def _final_params(out):
    directory = out / "checkpoints"
    info = ckpt.read_checkpoint(str(directory / f"step_{ckpt.list_checkpoints(str(directory))[-1]:08d}.json"))
    return {k: v.asnumpy() for k, v in ckpt.load_parameters(info).items()}


def test_ecss_trains_like_the_plain_trainer_from_one_checkpoint(real_corpus, tmp_path, monkeypatch):
    # Both runs continue one plain checkpoint, so they start from the same weights; with the host
    # updating every expert each step (dense AdamW semantics) they must be the same computation.
    _, prepared = real_corpus
    config = _real_config(prepared, steps=12)
    start = tmp_path / "start"
    train(config, steps=1, out_dir=str(start))
    first = str(start / "checkpoints" / "step_00000001.ckpt")
    plain = train(config, out_dir=str(tmp_path / "plain"), resume=first)
    monkeypatch.setattr(ExpertOffload, "dense_semantics", True)
    with_ecss = train(apply_overrides(config, ["ecss.enabled=true"]), out_dir=str(tmp_path / "ecss"), resume=first)
    assert with_ecss.ecss["h2d_bytes"] > 0 and plain.ecss is None
    np.testing.assert_allclose(with_ecss.final_loss, plain.final_loss, rtol=1e-5)
    a, b = _final_params(tmp_path / "plain"), _final_params(tmp_path / "ecss")
    assert a.keys() == b.keys()  # the same names: an ECSS checkpoint loads without ECSS and back
    names = sorted(a)
    assert_close_to_scale([b[n] for n in names], [a[n] for n in names], rel=1e-4, what="weights after 11 steps")


def test_untouched_experts_stay_bit_identical_and_touched_ones_move(real_corpus, tmp_path):
    # The corpus has 3 domains, the model 4: domain 3's experts are never active.
    _, prepared = real_corpus
    config = apply_overrides(_real_config(prepared, steps=4), ["ecss.enabled=true"])
    start = tmp_path / "start"
    train(dataclasses.replace(config, ecss=dataclasses.replace(config.ecss, enabled=False)), steps=1,
          out_dir=str(start))
    before = _final_params(start)
    summary = train(config, out_dir=str(tmp_path / "run"), resume=str(start / "checkpoints" / "step_00000001.ckpt"))
    after = _final_params(tmp_path / "run")
    per_domain = config.moe.experts_per_domain
    idle = slice(3 * per_domain, 4 * per_domain)
    expert_names = [n for n in after if ".experts." in n]
    assert expert_names and summary.ecss["h2d_bytes"] > 0
    for name in expert_names:
        assert np.array_equal(after[name][idle], before[name][idle]), name  # weights and both moments
        if not name.startswith("adam_"):
            assert not np.array_equal(after[name][:per_domain], before[name][:per_domain]), name


def test_host_adamw_equals_the_device_kernel_on_touched_rows_only():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(5)
    experts, lr = 6, 0.01
    shapes = {"w1": (4, 5), "b1": (1, 5), "w2": (5, 4), "b2": (1, 4)}
    weights = {t: rng.standard_normal((experts, *s)).astype(np.float32) for t, s in shapes.items()}
    store = HostExpertStore.from_weights(["layer"], [weights])
    layer = store.layers[0]
    for t in EXPERT_TENSORS:
        layer.moment1[t][...] = rng.standard_normal(layer.moment1[t].shape) * 0.1
        layer.moment2[t][...] = rng.random(layer.moment2[t].shape) * 0.1
    start = {name: array.copy() for name, array in store.entries().items()}
    touched = np.array([1, 4])
    grads = {t: rng.standard_normal((2, *s)).astype(np.float32) for t, s in shapes.items()}
    settings = AdamWSettings(0.9, 0.95, 1e-8, {"w1": 0.1, "w2": 0.1, "b1": 0.0, "b2": 0.0})
    adamw_rows(layer, touched, grads, lr, settings)
    kernel = ops.AdamWeightDecay()
    for t in EXPERT_TENSORS:
        for row, expert in enumerate(touched):
            param = Parameter(Tensor(start[f"layer.{t}"][expert]), name="p")
            m = Parameter(Tensor(start[f"adam_m.layer.{t}"][expert]), name="m")
            v = Parameter(Tensor(start[f"adam_v.layer.{t}"][expert]), name="v")
            kernel(param, m, v, lr, 0.9, 0.95, 1e-8, settings.weight_decay[t], Tensor(grads[t][row]))
            # float32 rounding of a few operations on values of order 1: a few eps.
            np.testing.assert_allclose(layer.weights[t][expert], param.asnumpy(), rtol=2e-6, atol=1e-7)
            np.testing.assert_allclose(layer.moment1[t][expert], m.asnumpy(), rtol=2e-6, atol=1e-8)
            np.testing.assert_allclose(layer.moment2[t][expert], v.asnumpy(), rtol=2e-6, atol=1e-9)
        untouched = np.setdiff1d(np.arange(experts), touched)
        assert np.array_equal(layer.weights[t][untouched], start[f"layer.{t}"][untouched])
        assert np.array_equal(layer.moment1[t][untouched], start[f"adam_m.layer.{t}"][untouched])


def _uneven_plans(config, rows_per_domain, seed=0):
    rng = np.random.default_rng(seed)
    domains = np.repeat(np.arange(len(rows_per_domain)), rows_per_domain).astype(np.int32)
    tokens = rng.integers(0, config.model.vocab_size, (len(domains), config.model.seq_length)).astype(np.int32)
    from mindformers_sigma.model.pangu_sigma import build_routing_tables

    planner = ExpertPlanner(build_routing_tables(config), config.moe.num_experts)
    return planner, tokens, domains


def test_slab_layout_renames_experts_to_slots_and_a_too_small_slab_is_one_error():
    config = micro_config(moe={"num_experts": 16, "num_domains": 4, "experts_per_domain": 4})
    planner, tokens, domains = _uneven_plans(config, (3, 0, 1, 0))  # two domains absent
    plan = planner.plan(tokens, domains)
    num_tokens = tokens.size
    assignment = assign_slots([plan], num_tokens, 16)
    remapped = assignment.remap(plan, num_tokens)
    for layer, experts in enumerate(assignment.active):
        assert set(experts.tolist()) <= set(range(0, 4)) | set(range(8, 12))  # domains 0 and 2 only
        used = (plan[layer, :, 1:] < num_tokens).any(axis=1)
        # Every used slot's slot id names its expert again; token rows are untouched.
        assert np.array_equal(experts[remapped[layer, used, 0]], plan[layer, used, 0])
        assert np.array_equal(remapped[layer, :, 1:], plan[layer, :, 1:])
    needed = max(e.size for e in assignment.active)
    with pytest.raises(DataError, match=rf"ecss: backbone.layers.\d needs {needed} experts in one step but "
                                        rf"ecss.slab_experts is {needed - 1}; raise it"):
        assign_slots([plan], num_tokens, needed - 1, ["backbone.layers.1", "backbone.layers.2"])
    assert smallest_safe_slab(config) == min(16, min(config.train.batch_size, 4) * 4)


def test_ecss_config_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match="learned router"):
        micro_config(moe={"router": "switch"}, ecss={"enabled": True})
    with pytest.raises(ConfigError, match="capacity_factor: null"):
        micro_config(moe={"capacity_factor": 1.5}, ecss={"enabled": True})
    with pytest.raises(ConfigError, match="ecss.slab_experts"):
        micro_config(ecss={"enabled": True, "slab_experts": 9})
    with pytest.raises(ConfigError, match="no experts to keep on the host"):
        micro_config(model={"dense_layers": 3, "sparse_layers": 0}, ecss={"enabled": True})


def _metrics(out):
    import json

    with open(out / "metrics.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_bytes_moved_are_the_active_experts_and_a_resumed_ecss_run_is_bitwise_the_same(real_corpus, tmp_path):
    _, prepared = real_corpus
    config = apply_overrides(_real_config(prepared, steps=6, checkpoint_interval=3), ["ecss.enabled=true"])
    straight = train(config, out_dir=str(tmp_path / "straight"))
    m = config.model
    expert_bytes = 4 * (2 * m.hidden_size * m.ffn_hidden_size + m.ffn_hidden_size + m.hidden_size)
    rows = _metrics(tmp_path / "straight")
    for row in rows:
        assert row["ecss_h2d_bytes"] == row["ecss_d2h_bytes"] == sum(row["ecss_active_experts"]) * expert_bytes
        tables = m.sparse_layers * config.moe.num_domains * m.vocab_size * 4  # int32 [domains, vocab] per layer
        assert row["ecss_host_resident_bytes"] == 3 * config.moe.num_experts * expert_bytes * m.sparse_layers + tables
    assert straight.ecss["h2d_bytes"] == sum(r["ecss_h2d_bytes"] for r in rows)
    # Stopped after step 3 and resumed: the same losses and the same checkpoint, bit for bit.
    train(dataclasses.replace(config, train=dataclasses.replace(config.train, steps=3)), out_dir=str(tmp_path / "cut"))
    train(config, out_dir=str(tmp_path / "cut"), resume="auto")
    assert [r["loss"] for r in _metrics(tmp_path / "cut")] == [r["loss"] for r in rows]
    a, b = _final_params(tmp_path / "straight"), _final_params(tmp_path / "cut")
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    # The ECSS checkpoint continues without ECSS (same names and shapes).
    plain = dataclasses.replace(config, ecss=dataclasses.replace(config.ecss, enabled=False),
                                train=dataclasses.replace(config.train, steps=7))
    assert train(plain, out_dir=str(tmp_path / "plain"), resume=straight.checkpoint).resumed_from == 6


def _write_config(tmp_path, prepared, **ecss):
    from mindformers_sigma.config import config_to_dict

    config = apply_overrides(_real_config(prepared, steps=10, checkpoint_interval=2, keep_checkpoints=3),
                             [f"ecss.{key}={value}" for key, value in {"enabled": "true", **ecss}.items()])
    path = tmp_path / "ecss.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    return path


def test_mmap_store_survives_sigkill_and_resumes_bitwise(real_corpus, tmp_path):
    _, prepared = real_corpus
    config = _write_config(tmp_path, prepared, host_store="mmap")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(train_cmd(config, straight), check=True, capture_output=True, cwd=REPO)
    assert not (straight / "ecss_store").exists()  # scratch: a finished run removes it
    step, code, _ = stop_after_checkpoint(config, killed, 4)
    assert code == -signal.SIGKILL and 4 <= step < 10
    assert sorted(p.name for p in (killed / "ecss_store").iterdir())[:1] == [
        "adam_m.backbone.layers.1.ffn.experts.b1.npy"]  # the killed run's store, in files under --out
    result = subprocess.run(train_cmd(config, killed, "--resume", "auto"), capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["loss"] for r in _metrics(killed)] == [r["loss"] for r in _metrics(straight)]
    a, b = _final_params(straight), _final_params(killed)
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


def test_mmap_store_without_out_is_one_error_line(tmp_path):
    config = micro_config(ecss={"enabled": True, "host_store": "mmap"})
    with pytest.raises(DataError, match="ecss.host_store: mmap keeps the expert store in files under --out"):
        train(config, steps=1)


@pytest.mark.slow
def test_bench_ecss_quick_runs_and_its_record_is_consistent(tmp_path):
    import json

    done = subprocess.run([sys.executable, "-m", "mindformers_sigma", "bench", "ecss", "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "ecss.json").read_text())
    scaling = record["scaling"]
    assert [row["experts"] for row in scaling] == [16, 64]
    # The slab is the same size in every case and the routing tables are on the host: device
    # memory must not grow with the experts; the host store (weights, two moments) grows in proportion.
    assert scaling[0]["device_resident_bytes"] == scaling[1]["device_resident_bytes"]
    assert scaling[1]["host_resident_bytes"] == 4 * scaling[0]["host_resident_bytes"]
    comparison = record["comparison"]
    assert comparison["moe"]["device_resident_bytes"] > comparison["ecss"]["device_resident_bytes"]
    assert record["speedup_vs_moe"] == comparison["ecss"]["tokens_per_s"] / comparison["moe"]["tokens_per_s"]
    assert record["machine"]["mindspore"] and "| 64 |" in done.stdout


def test_prefetching_the_next_step_changes_nothing_even_for_experts_both_steps_share(real_corpus, tmp_path):
    # With prefetch the next step's experts are copied out while this step runs; those this step
    # then updates must be copied again before the load, or the next step would use stale weights.
    _, prepared = real_corpus
    config = apply_overrides(_real_config(prepared, steps=6), ["ecss.enabled=true"])
    runs = {}
    for prefetch in (True, False):
        out = tmp_path / f"prefetch_{prefetch}"
        train(apply_overrides(config, [f"ecss.prefetch={str(prefetch).lower()}"]), out_dir=str(out))
        runs[prefetch] = (_metrics(out), _final_params(out))
    with_prefetch, without = runs[True], runs[False]
    assert [r["loss"] for r in with_prefetch[0]] == [r["loss"] for r in without[0]]
    assert all(np.array_equal(with_prefetch[1][n], without[1][n]) for n in without[1])
    assert sum(sum(r["ecss_refreshed_experts"]) for r in with_prefetch[0]) > 0  # the shared-expert path ran
    assert sum(sum(r["ecss_refreshed_experts"]) for r in without[0]) == 0


def test_a_checkpoint_expert_of_another_dtype_or_shape_is_refused_by_name():
    store = HostExpertStore.from_weights(["layer"], [{"w1": np.zeros((2, 3, 4), np.float32),
                                                      "b1": np.zeros((2, 1, 4), np.float32),
                                                      "w2": np.zeros((2, 4, 3), np.float32),
                                                      "b2": np.zeros((2, 1, 3), np.float32)}])
    good = {name: array.copy() for name, array in store.entries().items()}
    for name, bad in (("layer.w1", np.zeros((2, 3, 4), np.float16)),
                      ("adam_v.layer.b2", np.zeros((3, 1, 3), np.float32))):
        with pytest.raises(DataError, match=rf"ckpt: {name} is \w+ of shape .* the model needs float32 of shape"):
            store.load(dict(good, **{name: bad}), "ckpt")
    with pytest.raises(DataError, match=r"ckpt: adam_m.layer.w2 is missing"):
        store.load({k: v for k, v in good.items() if k != "adam_m.layer.w2"}, "ckpt")
    store.load(good, "ckpt")  # the right arrays load
