"""Sharded training on CPU workers: data x model x expert parallel with the optimizer shard against one
process, the collectives against numpy, sharded checkpoints read by every command and by MindSpore's
transform, resumed onto other layouts, and a rank dying mid-save."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time

import mindspore as ms
import numpy as np
import pytest
import yaml
from mindspore.parallel import transform_checkpoints

from mindformers_sigma.checkpoint import files as ckpt
from mindformers_sigma.config import config_from_dict, config_to_dict
from mindformers_sigma.distributed.topology import Topology
from mindformers_sigma.model.initial_values import full_shape, piece_of
from mindformers_sigma.training.global_batch import GlobalBatchReader
from mindformers_sigma.training.trainer import build_train_step, expert_planner
from mindformers_sigma.training.training_data import open_training_data

from conftest import REPO, assert_close_to_scale, lifecycle_config
from launcher_helpers import SCRIPT, VENV_BIN, base_env, launcher

STEPS = 8
SPLIT = ("--set", "parallel.model_parallel=2", "--set", "parallel.expert_parallel=2")
REL = 1e-5


def _config(prepared):
    """The micro PanGu-Σ on real text (EOD inside samples, three domains), vocabulary-parallel and with the
    optimizer shard on (both inert in one process), a checkpoint every 4 steps."""
    return lifecycle_config(prepared, parallel={"vocab_parallel": True, "optimizer_shard": True},
                            train={"steps": STEPS, "checkpoint_interval": 4, "log_interval": 1})


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _close(actual, expected):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected), 1):
        assert abs(a - e) <= REL * abs(e), f"step {step}: {a} vs {e}"


@pytest.fixture(scope="module")
def runs(real_corpus, tmp_path_factory):
    """One process and 4 workers (dp2 x mp2, experts over 2) training the same 8 steps."""
    _, prepared = real_corpus
    root = tmp_path_factory.mktemp("distributed")
    config_path = root / "micro.yaml"
    config_path.write_text(yaml.safe_dump(config_to_dict(_config(prepared))))
    one = subprocess.run([sys.executable, "-m", "mindformers_sigma", "train", "--config", str(config_path),
                          "--out", str(root / "one")], capture_output=True, text=True, cwd=REPO)
    assert one.returncode == 0, one.stderr[-2000:]
    logs = root / "logs"
    four = launcher("--cpu", "--workers", 4, "--master-port", 8261, "--log-dir", logs, config_path,
                    "--", "--out", root / "four", *SPLIT, timeout=600)
    assert four.returncode == 0, (four.stderr[-2000:], (logs / "worker_1.log").read_text()[-3000:])
    return config_path, root


@pytest.mark.slow
def test_four_workers_dp2_mp2_ep2_with_the_optimizer_shard_train_as_one_process(runs):
    config_path, root = runs
    _close(_losses(root / "four"), _losses(root / "one"))
    log = (root / "logs" / "worker_3.log").read_text()
    assert "rank 3: data 1 of 2, model 1 of 2, experts 3..5 of 6" in log  # each rank says where it sits
    # A sharded step: every rank's part, the strategy file and one sidecar naming the layout.
    step = root / "four" / "checkpoints" / "step_00000008"
    assert sorted(p.name for p in step.iterdir()) == ["rank_0", "rank_0.json", "rank_1", "rank_1.json", "rank_2",
                                                      "rank_2.json", "rank_3", "rank_3.json", "strategy.json"]
    info = ckpt.read_checkpoint(str(step) + ".json")
    assert info.meta["sharded_layout"]["model_parallel"] == 2
    # Rank 3's part holds its slices: 3 of the 6 experts with half their F, half the vocabulary, and of a
    # query weight's moments the rows of its data shard in its half of the columns.
    part = ms.load_checkpoint(str(step / "rank_3" / "part.ckpt"))
    one = ms.load_checkpoint(str(root / "one" / "checkpoints" / "step_00000008.ckpt"))
    w1 = "backbone.top_query_layer.ffn.experts.w1"
    assert part[w1].shape == (3, 32, 24) and one[w1].shape == (6, 32, 48)
    assert part["backbone.embedding.word.embedding_table"].shape == (256, 32)
    assert part["adam_m.backbone.layers.0.attention.query.weight"].shape == (16, 16)  # [32, 32/mp] rows / dp


def _one_process_first_gradients(raw: dict) -> dict:
    """One process accumulating the two data shards' halves: the same rows and dropout seeds as the ranks."""
    raw = copy.deepcopy(raw)
    raw["train"]["grad_accumulation_steps"] = 2
    config = config_from_dict(raw)
    data = open_training_data(config)
    step_cell = build_train_step(config, data.token_frequency)
    reader = GlobalBatchReader(data.source, config.train.batch_size, 1, 0, 2, config.model.eod_token_id,
                               expert_planner(config, step_cell), config.context.seed, config.model.dropout_rate > 0)
    grads = None
    for tokens, domains, *rest in reader.read(0, 0).micro_batches:
        _, micro = step_cell.forward_backward(tokens, domains, ms.Tensor(1.0, ms.float32), *rest)
        grads = micro if grads is None else [a + b for a, b in zip(grads, micro)]
    names = [p.name for p in step_cell.apply_gradients.optimizer.parameters]
    return {name: grad.asnumpy() for name, grad in zip(names, grads)}


@pytest.mark.slow
def test_first_gradients_equal_one_process_and_collectives_equal_numpy(runs, tmp_path):
    config_path, _ = runs
    rre = yaml.safe_load(config_path.read_text())
    rre["model"]["dropout_rate"] = 0.1  # the heads' attention dropout split over mp draws one process's mask
    switch = copy.deepcopy(rre)  # a learned gate: the capacity-bounded buffers are exchanged instead
    switch["moe"].update(router="switch", capacity_factor=None)
    singles, paths = [], []
    for index, raw in enumerate((rre, switch)):
        singles.append(copy.deepcopy(raw))
        raw["parallel"].update(mode="hybrid_parallel", device_num=4, data_parallel=2, model_parallel=2,
                               expert_parallel=2)
        paths.append(tmp_path / f"four_{index}.yaml")
        paths[-1].write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    out.mkdir()
    env = dict(base_env(), PYTHONPATH=str(REPO))
    result = subprocess.run([str(VENV_BIN / "msrun"), "--worker_num=4", "--local_worker_num=4",
                             "--master_port=8263", f"--log_dir={tmp_path / 'logs'}", "--join=True",
                             str(REPO / "tests" / "distributed_worker.py"), str(out), *map(str, paths)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, (tmp_path / "logs" / "worker_0.log").read_text()[-3000:]
    ranks = [dict(np.load(out / f"rank_{rank}.npz")) for rank in range(4)]
    topologies = [Topology(2, 2, 2, rank) for rank in range(4)]

    # Collectives: every group's forward sum and backward sum, against numpy.
    inputs = [np.arange(6, dtype=np.float32).reshape(2, 3) * (rank + 1) for rank in range(4)]
    group_of = {"data": Topology.data_group, "model": Topology.model_group, "expert": Topology.expert_group,
                "expert_model": Topology.expert_model_group, "expert_data": Topology.expert_data_group}
    for found, topology in zip(ranks, topologies):
        for forward, forward_group in group_of.items():
            for backward, backward_group in group_of.items():
                summed = sum(inputs[r] for r in forward_group(topology)[1])
                grad = np.full((2, 3), sum(r + 1.0 for r in backward_group(topology)[1]), np.float32)
                np.testing.assert_array_equal(found[f"sum_{forward}_{backward}"], summed)
                np.testing.assert_array_equal(found[f"grad_{forward}_{backward}"], grad)
        # the summed-zero-buffer gather equals numpy's stack and the real AllGather on the world group
        np.testing.assert_array_equal(found["gather_world_all_reduce"], np.stack(inputs))
        np.testing.assert_array_equal(found["gather_world_all_gather"], np.stack(inputs))
        np.testing.assert_array_equal(found["gather_model"], np.stack([inputs[r] for r in topology.model_group()[1]]))
    assert topologies[1].expert_group()[1] == (1, 3) and topologies[1].model_group()[1] == (0, 1)

    # Gradients before the first update: the pieces, put where they sit, are one process's gradients.
    for index, single in enumerate(singles):
        expected = _one_process_first_gradients(single)
        merged = {}
        for name, whole in expected.items():
            merged[name] = np.full(whole.shape, np.nan, np.float32)
            for found, topology in zip(ranks, topologies):
                piece = found[f"grad{index}:{name}"]
                assert full_shape(name, piece.shape, topology, True) == whole.shape, name
                merged[name][piece_of(name, whole.shape, piece.shape, topology, True)] = piece
        prefix = f"grad{index}:"
        assert set(merged) == {key[len(prefix):] for key in ranks[0] if key.startswith(prefix)}
        assert_close_to_scale([merged[n] for n in expected], list(expected.values()), REL, f"gradients {index}")


@pytest.mark.slow
def test_a_sharded_step_is_read_by_generate_and_by_mindsporeS_transform(runs, tmp_path):
    _, root = runs
    step = root / "four" / "checkpoints" / "step_00000008"
    texts = []
    for checkpoint in (step, root / "one" / "checkpoints" / "step_00000008.ckpt"):
        result = subprocess.run([sys.executable, "-m", "mindformers_sigma", "generate", "--ckpt", str(checkpoint),
                                 "--prompt", "def insort", "--domain", "code", "--max-new-tokens", "12"],
                                capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stderr[-2000:]
        texts.append(result.stdout)
    assert texts[0] == texts[1] and texts[0].strip()
    # MindSpore's own transform, reading the parts with the strategy file, merges them as we do.
    transform_checkpoints(str(step), str(tmp_path / "merged"), "whole", str(step / "strategy.json"), None)
    theirs = ms.load_checkpoint(str(tmp_path / "merged" / "rank_0" / "whole0.ckpt"))
    ours = ckpt.read_tensors(ckpt.read_checkpoint(str(step) + ".json"))
    assert set(ours) <= set(theirs)
    for name, value in ours.items():
        np.testing.assert_array_equal(theirs[name].asnumpy(), value, err_msg=name)
    # A rank's part is not a checkpoint; a layout edited away from the recorded config's is not merged.
    tampered = tmp_path / "tampered"
    shutil.copytree(step, tampered / step.name)
    sidecar = json.loads((step.parent / f"{step.name}.json").read_text())
    sidecar["sharded_layout"].update(data_parallel=4, model_parallel=1)
    (tampered / f"{step.name}.json").write_text(json.dumps(sidecar))
    for checkpoint, words in ((step / "rank_0" / "part.ckpt", "one rank's part of the sharded step"),
                              (tampered / step.name, "is not the layout of the recorded config's parallel section")):
        result = subprocess.run([sys.executable, "-m", "mindformers_sigma", "extract", "--ckpt", str(checkpoint),
                                 "--domain", "code", "--out", str(tmp_path / "sub")], capture_output=True, text=True,
                                cwd=REPO)
        assert result.returncode == 2 and words in result.stderr and len(result.stderr.splitlines()) == 1
        assert not (tmp_path / "sub").exists()


@pytest.mark.slow
def test_resume_from_four_workers_onto_one_process_and_onto_two_workers(runs):
    config_path, root = runs
    step4 = root / "four" / "checkpoints" / "step_00000004"
    one = subprocess.run([sys.executable, "-m", "mindformers_sigma", "train", "--config", str(config_path),
                          "--out", str(root / "resumed_1"), "--resume", str(step4)],
                         capture_output=True, text=True, cwd=REPO)
    assert one.returncode == 0, one.stderr[-2000:]
    _close(_losses(root / "resumed_1"), _losses(root / "one")[4:])
    logs = root / "logs_2"
    two = launcher("--cpu", "--workers", 2, "--master-port", 8265, "--log-dir", logs, config_path,
                   "--", "--out", root / "resumed_2", "--resume", step4, "--set", "parallel.model_parallel=2",
                   timeout=600)
    assert two.returncode == 0, (two.stderr[-2000:], (logs / "worker_0.log").read_text()[-3000:])
    _close(_losses(root / "resumed_2"), _losses(root / "one")[4:])


@pytest.mark.slow
def test_a_rank_dying_mid_save_leaves_the_previous_step_for_resume_auto(runs):
    config_path, root = runs
    out = root / "resumed_2"  # two workers (mp2) resumed at step 4 and committed step 8; go on to 16
    assert ckpt.list_checkpoints(str(out / "checkpoints")) == [8]
    # Once step 9 is logged (the run's start-up cleaning is over), a folder takes the place of rank 1's part
    # of step 12: rank 1 dies writing it, and the launcher stops rank 0, which was writing its own part or
    # waiting for rank 1's.
    logs = root / "logs_kill"
    command = ["bash", str(SCRIPT), *map(str, ("--cpu", "--workers", 2, "--master-port", 8267, "--log-dir", logs,
                                               config_path, "--", "--out", out, "--resume", "auto", "--steps", 16,
                                               "--set", "parallel.model_parallel=2"))]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=base_env(), cwd=REPO)
    metrics = out / "metrics.jsonl"
    while process.poll() is None and len(metrics.read_text().splitlines()) < 5:
        time.sleep(0.01)
    os.makedirs(out / "checkpoints" / "step_00000012" / "rank_1" / "part.ckpt")
    _, stderr = process.communicate(timeout=600)
    assert process.returncode != 0 and "rank 1 exited with code" in stderr, stderr
    assert ckpt.list_checkpoints(str(out / "checkpoints")) == [8]  # step 12 never committed
    info = ckpt.find_resume_checkpoint(str(out / "checkpoints"), print)
    assert info.step == 8


@pytest.mark.slow
def test_ecss_on_four_workers_trains_as_one_process_and_moves_the_same_expert_bytes(runs):
    # Each rank's host store holds its 3 experts' model-parallel halves; together the ranks fetch each
    # active expert's gradient once, as the one process does.  Loads move at least those bytes (a load
    # filling over half a slab writes the whole slab, so the ranks' loads differ from the one process's).
    config_path, root = runs
    ecss = ("--set", "ecss.enabled=true")
    one = subprocess.run([sys.executable, "-m", "mindformers_sigma", "train", "--config", str(config_path),
                          "--out", str(root / "ecss_one"), *ecss], capture_output=True, text=True, cwd=REPO)
    assert one.returncode == 0, one.stderr[-2000:]
    logs = root / "logs_ecss"
    four = launcher("--cpu", "--workers", 4, "--master-port", 8269, "--log-dir", logs, config_path,
                    "--", "--out", root / "ecss_four", *SPLIT, *ecss, timeout=600)
    assert four.returncode == 0, (four.stderr[-2000:], (logs / "worker_1.log").read_text()[-3000:])
    _close(_losses(root / "ecss_four"), _losses(root / "ecss_one"))
    one_to, one_from = re.search(r"ECSS moved ([\d.,]+) MiB to and ([\d.,]+) MiB from", one.stdout).groups()
    four_to, four_from = re.search(r"all ranks: ([\d.,]+) MiB to and ([\d.,]+) MiB from their devices",
                                   four.stdout).groups()
    assert four_from == one_from
    assert float(four_to.replace(",", "")) >= float(four_from.replace(",", ""))
    assert float(one_to.replace(",", "")) >= float(one_from.replace(",", ""))


@pytest.mark.parametrize("workers,sets,words", [
    (4, ["parallel.model_parallel=3"], "--workers 4 is not data_parallel x model_parallel: parallel.model_parallel "
                                       "is 3; start a multiple of 3 workers"),
    (6, ["parallel.model_parallel=3"], "parallel.model_parallel = 3: must divide model.num_heads (4)"),
    (8, ["parallel.model_parallel=2", "parallel.expert_parallel=4", "moe.num_experts=6", "moe.num_domains=3"],
     "parallel.expert_parallel = 4: must divide moe.num_experts (6)"),
    (2, ["parallel.expert_parallel=4"], "parallel.expert_parallel = 4: must divide parallel.data_parallel (2)"),
    (4, ["parallel.pipeline_stage=2"], "parallel.pipeline_stage > 1 is planned, but the pipelined train step is not built"),
])
def test_a_wrong_layout_is_one_line_before_any_rank_starts(tmp_path, workers, sets, words):
    config = tmp_path / "tiny.yaml"
    config.write_text((REPO / "ascend_configs" / "pangu_sigma_tiny_cpu.yaml").read_text())
    result = launcher("--cpu", "--workers", workers, "--master-port", 8271, "--log-dir", tmp_path / "logs", config,
                      "--", "--out", tmp_path / "out", *[item for s in sets for item in ("--set", s)], timeout=120)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert words in line and "Traceback" not in result.stdout
    assert not (tmp_path / "logs").exists() and not (tmp_path / "out").exists()  # no rank was started
