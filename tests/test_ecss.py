"""ECSS: experts on the host, a slab on the device, a host AdamW (``mindformers_sigma/ecss/``)."""

from __future__ import annotations

import dataclasses
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
from mindspore import Parameter, Tensor, ops

from mindformers_sigma.checkpoint import files as ckpt
from mindformers_sigma.config import ConfigError, apply_overrides
from mindformers_sigma.ecss.host_adamw import AdamWSettings, adamw_rows
from mindformers_sigma.ecss.host_store import HostExpertStore
from mindformers_sigma.ecss.offload import ExpertOffload
from mindformers_sigma.ecss.slab import plan_slab_loads, smallest_safe_slab, whole_step_slab
from mindformers_sigma.errors import DataError
from mindformers_sigma.model.names import EXPERT_TENSORS, expert_tensor_names
from mindformers_sigma.moe.expert_plan import ExpertPlanner
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


def _metrics(out):
    with open(out / "metrics.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_ecss_trains_like_the_plain_trainer_from_one_checkpoint(real_corpus, tmp_path, monkeypatch):
    # Both runs continue one plain checkpoint, so they start from the same weights; with the host
    # updating every expert each step (dense AdamW semantics) they must be the same computation.
    _, prepared = real_corpus
    config = _real_config(prepared, steps=21)
    start = tmp_path / "start"
    train(config, steps=1, out_dir=str(start))
    first = str(start / "checkpoints" / "step_00000001.ckpt")
    plain = train(config, out_dir=str(tmp_path / "plain"), resume=first)
    monkeypatch.setattr(ExpertOffload, "dense_semantics", True)
    with_ecss = train(apply_overrides(config, ["ecss.enabled=true"]), out_dir=str(tmp_path / "ecss"), resume=first)
    assert with_ecss.ecss["h2d_bytes"] > 0 and plain.ecss is None
    runs = _metrics(tmp_path / "plain"), _metrics(tmp_path / "ecss")
    assert len(runs[0]) == len(runs[1]) == 20
    for key in ("loss", "grad_norm"):  # the norm covers dense and slab gradients alike
        np.testing.assert_allclose([r[key] for r in runs[1]], [r[key] for r in runs[0]], rtol=1e-5, err_msg=key)
    a, b = _final_params(tmp_path / "plain"), _final_params(tmp_path / "ecss")
    assert a.keys() == b.keys()  # the same names: an ECSS checkpoint loads without ECSS and back
    names = sorted(a)
    assert_close_to_scale([b[n] for n in names], [a[n] for n in names], rel=1e-4, what="weights after 20 steps")


def test_a_step_whose_experts_overflow_the_slab_is_reloaded_per_micro_batch_with_the_same_result(real_corpus,
                                                                                                  tmp_path):
    # Four micro-batches of one sample: a slab of 2 holds one domain's experts, so it is reloaded
    # whenever the next sample's domain differs.  The host sums each load's gradients and adds
    # their squares to the clip (binding at 0.05) and the overflow check: the same computation as
    # one load of every expert the step needs.
    _, prepared = real_corpus
    config = apply_overrides(_real_config(prepared, steps=6, grad_accumulation_steps=4, grad_clip_norm=0.05),
                             ["ecss.enabled=true"])
    assert smallest_safe_slab(config) == 2
    train(config, out_dir=str(tmp_path / "one_load"))
    train(apply_overrides(config, ["ecss.slab_experts=2"]), out_dir=str(tmp_path / "reloaded"))
    one, reloaded = _metrics(tmp_path / "one_load"), _metrics(tmp_path / "reloaded")
    assert all(r["ecss_slab_loads"] == 1 for r in one)
    assert sum(r["ecss_slab_loads"] > 1 for r in reloaded) >= 3  # most steps mix domains
    assert all(r["grad_norm"] > 0.05 for r in one)  # the clip binds, so the host's squares matter
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in reloaded], [r[key] for r in one], rtol=1e-5, err_msg=key)
    m = config.model
    expert_bytes = 4 * (2 * m.hidden_size * m.ffn_hidden_size + m.ffn_hidden_size + m.hidden_size)
    for a, b in zip(one, reloaded):
        assert a["ecss_active_experts"] == b["ecss_active_experts"]  # the same experts updated
        assert b["ecss_h2d_bytes"] == b["ecss_d2h_bytes"] == sum(b["ecss_loaded_experts"]) * expert_bytes
        assert all(n <= 2 * b["ecss_slab_loads"] for n in b["ecss_loaded_experts"])  # a load holds <= 2
    a, b = _final_params(tmp_path / "one_load"), _final_params(tmp_path / "reloaded")
    names = sorted(a)
    assert_close_to_scale([b[n] for n in names], [a[n] for n in names], rel=1e-4, what="weights after 6 steps")


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
    store = HostExpertStore.allocate(["layer"], shapes, experts)
    layer = store.layers[0]
    for t in EXPERT_TENSORS:
        layer.weights[t][...] = rng.standard_normal(layer.weights[t].shape)
        layer.moment1[t][...] = rng.standard_normal(layer.moment1[t].shape) * 0.1
        layer.moment2[t][...] = rng.random(layer.moment2[t].shape) * 0.1
    start = {name: array.copy() for name, array in store.entries().items()}
    touched = np.array([1, 4])
    grads = {t: rng.standard_normal((2, *s)).astype(np.float32) for t, s in shapes.items()}
    settings = AdamWSettings(0.9, 0.95, 1e-8, {"w1": 0.1, "w2": 0.1, "b1": 0.0, "b2": 0.0})
    adamw_rows(layer, touched, grads, lr, settings)
    kernel = ops.AdamWeightDecay()
    for t, name in zip(EXPERT_TENSORS, expert_tensor_names("layer")):
        for row, expert in enumerate(touched):
            param = Parameter(Tensor(start[name][expert]), name="p")
            m = Parameter(Tensor(start[f"adam_m.{name}"][expert]), name="m")
            v = Parameter(Tensor(start[f"adam_v.{name}"][expert]), name="v")
            kernel(param, m, v, lr, 0.9, 0.95, 1e-8, settings.weight_decay[t], Tensor(grads[t][row]))
            # float32 rounding of a few operations on values of order 1: a few eps.
            np.testing.assert_allclose(layer.weights[t][expert], param.asnumpy(), rtol=2e-6, atol=1e-7)
            np.testing.assert_allclose(layer.moment1[t][expert], m.asnumpy(), rtol=2e-6, atol=1e-8)
            np.testing.assert_allclose(layer.moment2[t][expert], v.asnumpy(), rtol=2e-6, atol=1e-9)
            # and the rule in float64 numpy (AdamWeightDecay: no bias correction, decoupled decay)
            g, p0 = grads[t][row].astype(np.float64), start[name][expert].astype(np.float64)
            m64 = 0.9 * start[f"adam_m.{name}"][expert] + 0.1 * g
            v64 = 0.95 * start[f"adam_v.{name}"][expert] + 0.05 * g * g
            p64 = p0 - lr * (m64 / (np.sqrt(v64) + 1e-8) + settings.weight_decay[t] * p0)
            np.testing.assert_allclose(layer.weights[t][expert], p64, rtol=2e-6, atol=1e-7)
            np.testing.assert_allclose(layer.moment1[t][expert], m64, rtol=2e-6, atol=1e-8)
            np.testing.assert_allclose(layer.moment2[t][expert], v64, rtol=2e-6, atol=1e-9)
        untouched = np.setdiff1d(np.arange(experts), touched)
        assert np.array_equal(layer.weights[t][untouched], start[name][untouched])
        assert np.array_equal(layer.moment1[t][untouched], start[f"adam_m.{name}"][untouched])


@pytest.mark.parametrize("host_store", ["ram", "mmap"])
def test_the_fused_host_adamw_gives_the_numpy_rules_bits(host_store, tmp_path):
    """The C kernel (one pass, every core) against the numpy rule: the same float32 operations in the same
    order, so the same bits, on unordered touched rows, with and without weight decay; untouched rows stay.
    Then gradients picked out of a larger array by ``grad_rows`` and multiplied by ``grad_scale`` in the
    kernel's pass (how ECSS hands over the slab's loss-scaled gradients without copying them) give the bits
    of the numpy rule fed those rows, copied out and multiplied by numpy in float32."""
    from mindformers_sigma.ecss.fused_kernel import fused_adamw
    from mindformers_sigma.ecss.host_adamw import numpy_adamw_rows

    assert fused_adamw() is not None  # CI's machines have a C compiler: the fused path is what runs there
    rng = np.random.default_rng(11)
    shapes = {"w1": (24, 40), "b1": (1, 40), "w2": (40, 24), "b2": (1, 24)}
    stores = [HostExpertStore.allocate(["layer"], shapes, 9, str(tmp_path / name) if host_store == "mmap" else None)
              for name in ("fused", "numpy")]
    for t in EXPERT_TENSORS:
        values = [rng.standard_normal(stores[0].layers[0].weights[t].shape) for _ in range(3)]
        for store in stores:
            layer = store.layers[0]
            layer.weights[t][...] = values[0]
            layer.moment1[t][...] = values[1] * 0.1
            layer.moment2[t][...] = np.abs(values[2]) * 0.01
    before = {name: array.copy() for name, array in stores[0].entries().items()}
    touched = np.array([7, 2, 5, 0])
    settings = AdamWSettings(0.9, 0.95, 1e-8, {"w1": 0.1, "w2": 0.1, "b1": 0.0, "b2": 0.0})
    for step in range(3):
        grads = {t: rng.standard_normal((touched.size, *s)).astype(np.float32) for t, s in shapes.items()}
        adamw_rows(stores[0].layers[0], touched, grads, 0.01, settings)
        numpy_adamw_rows(stores[1].layers[0], touched, grads, 0.01, settings)
    slab_grads = {t: rng.standard_normal((6, *s)).astype(np.float32) * 1024 for t, s in shapes.items()}
    grad_rows, scale = np.array([4, 0, 5, 2]), np.float32(0.37 / 1024)
    adamw_rows(stores[0].layers[0], touched, slab_grads, 0.01, settings, grad_rows, float(scale))
    numpy_adamw_rows(stores[1].layers[0], touched, {t: g[grad_rows] * scale for t, g in slab_grads.items()}, 0.01,
                     settings)
    with pytest.raises(IndexError):  # the kernel writes raw memory: an expert outside the store is refused first
        adamw_rows(stores[0].layers[0], np.array([9]), {t: g[:1] for t, g in grads.items()}, 0.01, settings)
    fused, reference = stores[0].entries(), stores[1].entries()
    for name, array in fused.items():
        assert np.array_equal(array, reference[name]), name
        untouched = np.setdiff1d(np.arange(9), touched)
        assert np.array_equal(array[untouched], before[name][untouched]), name
        assert not np.array_equal(array[touched], before[name][touched]), name


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
    (load,) = plan_slab_loads([planner.active_experts(tokens, domains)], 16)
    remapped = load.assignment.remap(plan, num_tokens)
    for layer, experts in enumerate(load.assignment.active):
        assert set(experts.tolist()) <= set(range(0, 4)) | set(range(8, 12))  # domains 0 and 2 only
        used = (plan[layer, :, 1:] < num_tokens).any(axis=1)
        assert np.array_equal(experts, np.unique(plan[layer, used, 0]))  # exactly the plan's experts
        # Every used slot's slot id names its expert again; token rows are untouched.
        assert np.array_equal(experts[remapped[layer, used, 0]], plan[layer, used, 0])
        assert np.array_equal(remapped[layer, :, 1:], plan[layer, :, 1:])
    needed = max(e.size for e in load.assignment.active)
    with pytest.raises(DataError, match=rf"ecss: backbone.layers.\d needs {needed} experts in one micro-batch but "
                                        rf"ecss.slab_experts is {needed - 1}; raise it"):
        plan_slab_loads([planner.active_experts(tokens, domains)], needed - 1,
                        ["backbone.layers.1", "backbone.layers.2"])
    batch, accumulation = config.train.batch_size, config.train.grad_accumulation_steps
    assert smallest_safe_slab(config) == min(16, min(batch // accumulation, 4) * 4)
    assert whole_step_slab(config) == min(16, min(batch, 4) * 4)


def test_params_reports_the_slab_sizes_of_a_config(tmp_path):
    from conftest import tiny_raw

    raw = tiny_raw()  # 4 domains x 2 experts; batch 8 in 4 micro-batches of 2 samples
    raw["train"]["grad_accumulation_steps"] = 4
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "mindformers_sigma", "params", "--config", str(path), "--json"],
                          capture_output=True, text=True, cwd=REPO)
    # 2 samples reach at most 2 domains' 4 experts; 8 samples all 4 domains' 8 experts.
    assert json.loads(done.stdout)["ecss_slab_experts"] == {"smallest_safe": 4, "whole_step": 8}


def test_micro_batches_share_a_load_while_their_experts_fit_and_reload_when_not():
    def experts(*groups):
        return [np.array(sorted(g), np.int32) for g in groups]  # one array per sparse layer

    micro = [experts({0, 1}, {4}), experts({1, 2}, {5}), experts({3, 6}, {4}), experts({7}, {4, 5, 6})]
    loads = plan_slab_loads(micro, 3)
    # {0,1,2} fits; adding {3,6} would make 5 in layer 0; {3,6,7} fits; every layer's union is exact.
    assert [(load.first, load.last) for load in loads] == [(0, 1), (2, 3)]
    assert [a.tolist() for a in loads[0].assignment.active] == [[0, 1, 2], [4, 5]]
    assert [a.tolist() for a in loads[1].assignment.active] == [[3, 6, 7], [4, 5, 6]]
    assert [(load.first, load.last) for load in plan_slab_loads(micro, 8)] == [(0, 3)]
    with pytest.raises(DataError, match="sparse layer 1 needs 3 experts in one micro-batch but ecss.slab_experts is 2"):
        plan_slab_loads(micro, 2)


def test_ecss_config_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match="learned router"):
        micro_config(moe={"router": "switch"}, ecss={"enabled": True})
    with pytest.raises(ConfigError, match="capacity_factor: null"):
        micro_config(moe={"capacity_factor": 1.5}, ecss={"enabled": True})
    with pytest.raises(ConfigError, match="ecss.slab_experts"):
        micro_config(ecss={"enabled": True, "slab_experts": 9})
    with pytest.raises(ConfigError, match="no experts to keep on the host"):
        micro_config(model={"dense_layers": 3, "sparse_layers": 0}, ecss={"enabled": True})


def test_bytes_moved_are_the_active_experts_or_a_whole_slab_and_a_resumed_ecss_run_is_bitwise_the_same(real_corpus, tmp_path):
    _, prepared = real_corpus
    config = apply_overrides(_real_config(prepared, steps=6, checkpoint_interval=3), ["ecss.enabled=true"])
    straight = train(config, out_dir=str(tmp_path / "straight"))
    m = config.model
    expert_bytes = 4 * (2 * m.hidden_size * m.ffn_hidden_size + m.ffn_hidden_size + m.hidden_size)
    rows = _metrics(tmp_path / "straight")
    slab = whole_step_slab(config)
    for row in rows:
        # gradients come back for the active experts only; a load filling over half the slab writes all of it
        assert row["ecss_d2h_bytes"] == sum(row["ecss_active_experts"]) * expert_bytes
        assert row["ecss_h2d_bytes"] == sum(slab if 2 * active > slab else active
                                            for active in row["ecss_active_experts"]) * expert_bytes
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


def _write_config(tmp_path, prepared, checkpoint_format="ckpt", **ecss):
    from mindformers_sigma.config import config_to_dict

    config = apply_overrides(_real_config(prepared, steps=10, checkpoint_interval=2, keep_checkpoints=3,
                                          checkpoint_format=checkpoint_format),
                             [f"ecss.{key}={value}" for key, value in {"enabled": "true", **ecss}.items()])
    path = tmp_path / "ecss.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    return path


def test_mmap_store_survives_sigkill_and_resumes_bitwise(real_corpus, tmp_path):
    # safetensors: the checkpoint format a memory-mapped store streams to and from
    _, prepared = real_corpus
    config = _write_config(tmp_path, prepared, host_store="mmap", checkpoint_format="safetensors")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(train_cmd(config, straight), check=True, capture_output=True, cwd=REPO)
    assert not (straight / "ecss_store").exists()  # scratch: a finished run removes it
    step, code, _ = stop_after_checkpoint(config, killed, 4)
    assert code == -signal.SIGKILL and 4 <= step < 10
    assert sorted(p.name for p in (killed / "ecss_store" / "rank_0").iterdir())[:1] == [
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


def test_an_mmap_store_that_does_not_fit_on_the_disk_says_how_much_in_units_that_show_it(tmp_path, monkeypatch):
    import collections
    import shutil

    from mindformers_sigma.training.memory_check import check_store_fits_on_disk

    config = micro_config(ecss={"enabled": True, "host_store": "mmap"})
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2 ** 30, 2 ** 30 - 4096, 4096))
    with pytest.raises(DataError, match=r"mmap needs \d+\.\d MiB under --out .* but 0\.0 MiB is free there"):
        check_store_fits_on_disk(config, str(tmp_path / "run"), 1)


def test_a_checkpoint_that_fails_on_a_full_disk_leaves_neither_its_temporary_nor_the_scratch_store(
        real_corpus, tmp_path, monkeypatch):
    """MindSpore writes STEM.tmp and renames it; when the disk fills up mid-write both that file and the
    memory-mapped store (scratch) must go, or the disk stays full."""
    _, prepared = real_corpus
    config = apply_overrides(_real_config(prepared, steps=2, checkpoint_interval=1),
                             ["ecss.enabled=true", "ecss.host_store=mmap"])
    real_save = ms.save_checkpoint

    def save_until_the_disk_fills(save_obj, ckpt_file_name, **kwargs):
        real_save(save_obj, ckpt_file_name, **kwargs)  # the whole file, under MindSpore's own temporary name
        os.replace(ckpt_file_name, os.path.splitext(ckpt_file_name)[0] + ".tmp")  # as if its rename never came
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ms, "save_checkpoint", save_until_the_disk_fills)
    with pytest.raises(OSError, match="No space left on device"):
        train(config, out_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run" / "ecss_store").exists()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == []


def test_a_background_update_that_fails_is_raised_and_the_scratch_store_still_goes(real_corpus, tmp_path,
                                                                                     monkeypatch):
    """The error of the update running behind a step reaches the run (at the next join), and the run's exit
    still removes the memory-mapped store and stops the thread."""
    import threading

    from mindformers_sigma.ecss import offload

    _, prepared = real_corpus
    config = apply_overrides(_real_config(prepared, steps=8), ["ecss.enabled=true", "ecss.host_store=mmap"])
    update = offload._adamw_all
    failed = []

    def disk_fills_behind_the_step(*args):
        if threading.current_thread().name.startswith("ecss-update"):
            failed.append(True)
            raise OSError(28, "No space left on device")
        return update(*args)

    monkeypatch.setattr(offload, "_adamw_all", disk_fills_behind_the_step)
    with pytest.raises(OSError, match="No space left on device"):
        train(config, out_dir=str(tmp_path / "run"))
    assert failed and not (tmp_path / "run" / "ecss_store").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("ecss-update")]


def test_prefetching_and_the_background_update_change_nothing_even_for_experts_both_steps_share(
        real_corpus, tmp_path, monkeypatch):
    # With prefetch the next step's experts are copied out while this step runs; those this step
    # then updates must be copied again before the load, or the next step would use stale weights.
    # The update of experts the next step does not use runs behind it: slowed down here, so the step
    # after next is staged while it still writes, and must wait for it and copy those rows again.
    import threading

    from mindformers_sigma.ecss import offload

    _, prepared = real_corpus
    config = apply_overrides(_real_config(prepared, steps=6), ["ecss.enabled=true"])
    runs = {}
    for name, prefetch, slow in (("prefetch", True, False), ("slow_background", True, True),
                                 ("serial", False, False)):
        if slow:
            update = offload._adamw_all

            def slow_in_background(*args):
                if threading.current_thread().name.startswith("ecss-update"):
                    time.sleep(0.5)
                return update(*args)

            monkeypatch.setattr(offload, "_adamw_all", slow_in_background)
        out = tmp_path / name
        train(apply_overrides(config, [f"ecss.prefetch={str(prefetch).lower()}"]), out_dir=str(out))
        runs[name] = (_metrics(out), _final_params(out))
    serial = runs["serial"]
    for name in ("prefetch", "slow_background"):
        metrics, params = runs[name]
        assert [r["loss"] for r in metrics] == [r["loss"] for r in serial[0]], name
        assert all(np.array_equal(params[n], serial[1][n]) for n in serial[1]), name
        assert sum(sum(r["ecss_refreshed_experts"]) for r in metrics) > 0  # the shared-expert path ran
        assert sum(sum(r["ecss_deferred_experts"]) for r in metrics) > 0  # and the background update
    assert sum(sum(r["ecss_refreshed_experts"]) + sum(r["ecss_deferred_experts"]) for r in serial[0]) == 0


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_a_checkpoint_expert_of_another_dtype_or_shape_is_refused_by_name(tmp_path, fmt):
    shapes = {"w1": (3, 4), "b1": (1, 4), "w2": (4, 3), "b2": (1, 3)}
    store = HostExpertStore.allocate(["layer"], shapes, 2)
    rng = np.random.default_rng(0)
    good = {name: rng.standard_normal(array.shape).astype(np.float32) for name, array in store.entries().items()}

    def saved(entries, step):
        path = ckpt.save_checkpoint(str(tmp_path), step, entries, {"data_position": 0}, fmt, keep=10)
        return ckpt.read_checkpoint(path.rsplit(".", 1)[0] + ".json")

    w1, _, w2, b2 = expert_tensor_names("layer")
    for step, (name, bad) in enumerate(((w1, np.zeros((2, 3, 4), np.float16)),
                                        (f"adam_v.{b2}", np.zeros((3, 1, 3), np.float32))), start=1):
        with pytest.raises(DataError, match=rf"ckpt: {name} is \w+ of shape .* the model needs float32 of shape"):
            ckpt.copy_into(saved(dict(good, **{name: bad}), step), store.entries(), "ckpt")
    with pytest.raises(DataError, match=rf"ckpt: adam_m.{w2} is missing"):
        ckpt.copy_into(saved({k: v for k, v in good.items() if k != f"adam_m.{w2}"}, 3), store.entries(), "ckpt")
    ckpt.copy_into(saved(good, 4), store.entries(), "ckpt")  # the right arrays load, exactly
    assert all(np.array_equal(store.entries()[name], good[name]) for name in good)


_BOUNDED_STORE = """
import resource, sys
import numpy as np
from mindspore import Parameter, Tensor
sys.path.insert(0, sys.argv[2])
from conftest import micro_config
from mindformers_sigma.checkpoint import files as ckpt
from mindformers_sigma.ecss.offload import ExpertOffload

def private_bytes():  # VmData: private memory (heap, anonymous maps); shared file maps do not count
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData:"))

out, H, F, E = sys.argv[1], 256, 1024, 64
config = micro_config(model={"hidden_size": H, "ffn_hidden_size": F}, ecss={"enabled": True, "host_store": "mmap"},
                      moe={"num_experts": E, "num_domains": 4, "experts_per_domain": 16})
slab = [Parameter(Tensor(np.zeros(shape, np.float32)), name=f"backbone.layers.{layer}.ffn.experts.{tensor}")
        for layer in (1, 2) for tensor, shape in (("w1", (4, H, F)), ("b1", (4, 1, F)), ("w2", (4, F, H)),
                                                  ("b2", (4, 1, H)))]
limit = private_bytes() + 32 * 2 ** 20  # one tensor of one layer is 64 MiB, the store 770 MiB
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
first = ExpertOffload.build(config, slab, {}, out + "/a")
for layer in first.store.layers:  # moments that are not zero, as after training
    for expert in range(E):
        layer.moment1["w1"][expert] = layer.weights["w1"][expert] * np.float32(0.5)
saved = ckpt.save_checkpoint(out + "/checkpoints", 1, first.checkpoint_parameters({}), {"data_position": 0},
                             "safetensors", 1)
second = ExpertOffload.build(config, slab, {}, out + "/b")
ckpt.copy_into(ckpt.read_checkpoint(saved.rsplit(".", 1)[0] + ".json"), second.host_arrays(), "resume")
same = all(np.array_equal(a[e], second.host_arrays()[name][e])
           for name, a in first.host_arrays().items() for e in range(E))
try:
    np.array(first.store.layers[0].weights["w1"])  # the control: one whole tensor copied into RAM
    control = "copied"
except MemoryError:
    control = "refused"
print(first.store.nbytes, same, control)
"""


def test_a_memory_mapped_store_is_built_checkpointed_and_restored_within_a_fraction_of_its_size(tmp_path):
    # Under a private-memory limit of 32 MiB above the start (RLIMIT_DATA; the store's shared file
    # mappings do not count) a 770 MiB store is drawn, saved as a safetensors checkpoint and read
    # back into a second store, bit for bit; a whole-tensor copy, the control, is refused.
    done = subprocess.run([sys.executable, "-c", _BOUNDED_STORE, str(tmp_path), str(REPO / "tests")],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    nbytes, same, control = done.stdout.split()[-3:]
    assert int(nbytes) > 750 * 2 ** 20 and same == "True" and control == "refused"
