"""The --out folder and resume: used folders, pruning, crash leftovers, corrupt checkpoints, other experiments."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml
from mindspore import Parameter, Tensor

from mindformers_sigma.checkpoint import files as ckpt
from mindformers_sigma.errors import DataError
from mindformers_sigma.training.trainer import train

from conftest import REPO, micro_config, tiny_raw


def _config(**train_keys):
    train_cfg = {"batch_size": 4, "steps": 4, "warmup_steps": 1, "checkpoint_interval": 2, "keep_checkpoints": 5,
                 "peak_flops": 1.0e11, "log_interval": 1}
    train_cfg.update(train_keys)
    return micro_config(train=train_cfg)


def _run(config, out, **kwargs):
    lines = []
    summary = train(config, out_dir=str(out), log=lines.append, **kwargs)
    return summary, lines


def _cli(tmp_path, out, *extra):
    raw = tiny_raw()
    raw["model"].update(vocab_size=64, hidden_size=32, num_heads=4, ffn_hidden_size=48, num_layers=3,
                        dense_layers=1, sparse_layers=2, seq_length=16)
    raw["train"].update(batch_size=4, steps=2, warmup_steps=1, peak_flops=1.0e11)
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(raw))
    return subprocess.run([sys.executable, "-m", "mindformers_sigma", "train", "--config", str(config),
                           "--out", str(out), *extra], capture_output=True, text=True, cwd=REPO)


def _one_error_line(result, *words):
    assert result.returncode == 2, result.stderr[-1500:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-1500:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _save(directory, step, value=0.0):
    params = {"w": Parameter(Tensor(np.full(8, value, np.float32)), name="w")}
    return ckpt.save_checkpoint(str(directory), step, params, {"data_position": step}, "ckpt", keep=2)


def test_pruning_keeps_this_runs_newest_and_never_touches_later_steps(pynative, tmp_path):
    _save(tmp_path, 100, 100.0)  # an earlier run's later checkpoint (or a corrupt one skipped by resume)
    (tmp_path / "step_00000001.ckpt").write_bytes(b"uncommitted weights of a killed save")
    (tmp_path / "step_00000200.ckpt").write_bytes(b"a later step's uncommitted weights: not ours")
    (tmp_path / "step_00000003.ckpt.bak").write_bytes(b"the user's own copy")
    written = [_save(tmp_path, step, float(step)) for step in (3, 6, 9)]
    assert ckpt.list_checkpoints(str(tmp_path)) == [6, 9, 100]
    assert os.path.isfile(written[-1]) and os.path.isfile(written[-2]) and not os.path.exists(written[0])
    assert not (tmp_path / "step_00000001.ckpt").exists()
    assert (tmp_path / "step_00000200.ckpt").exists() and (tmp_path / "step_00000003.ckpt.bak").exists()


@pytest.mark.parametrize("field,value", [("config", "x"), ("format", "pt"), ("weights", "/etc/passwd"),
                                         ("step", "6"), ("data_position", -1), ("sha256", None)])
def test_a_sidecar_that_parses_but_is_damaged_is_skipped(pynative, tmp_path, field, value):
    _save(tmp_path, 3, 3.0)
    _save(tmp_path, 6, 6.0)
    sidecar = tmp_path / "step_00000006.json"
    meta = json.loads(sidecar.read_text())
    meta[field] = value
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"unusable sidecar .*field {field}"):
        ckpt.read_checkpoint(str(sidecar))
    lines = []
    assert ckpt.find_resume_checkpoint(str(tmp_path), lines.append).step == 3 and "step 6" in lines[0]


def test_a_new_run_refuses_a_used_out_folder_and_bad_out_paths(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    _one_error_line(_cli(tmp_path, used), "not empty", "--resume auto", "--overwrite")
    assert (used / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n'
    (tmp_path / "a_file").write_text("x")
    _one_error_line(_cli(tmp_path, tmp_path / "a_file"), "not a folder")
    _one_error_line(_cli(tmp_path, tmp_path / "a_file" / "run"), "cannot write there")
    corrupt = tmp_path / "corrupt"
    (corrupt / "checkpoints").mkdir(parents=True)
    (corrupt / "checkpoints" / "step_00000002.json").write_text("{}")
    _one_error_line(_cli(tmp_path, corrupt, "--resume", "auto"), "none of the 1 checkpoints", "--overwrite")


def test_a_second_writer_is_refused_while_a_run_holds_the_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write("4242\n")
        handle.flush()
        _one_error_line(_cli(tmp_path, out, "--resume", "auto"), "another training run (pid 4242)")


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """A finished 2-step run (checkpoint at step 2), trained once and copied by each test."""
    out = tmp_path_factory.mktemp("two_step") / "run"
    _run(_config(steps=2), out)
    return out


def _copy_of(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_overwrite_replaces_only_the_previous_runs_outputs(two_step_run, tmp_path):
    out = _copy_of(two_step_run, tmp_path)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        _run(_config(steps=2), out)
    (out / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    (out / "checkpoints" / "step_00000001.txt").write_text("the user's notes on step 1")
    summary, _ = _run(_config(steps=1), out, overwrite=True)
    assert (out / "checkpoints" / "step_00000001.txt").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1] and (out / "notes.txt").read_text() == "mine"
    assert ckpt.list_checkpoints(str(out / "checkpoints")) == [1]
    assert summary.resumed_from is None


def _metrics(out):
    """What a run computed at each step (timings left out: they are measured, not computed)."""
    keys = ("step", "loss", "domain_loss", "lr", "loss_scale", "finite", "dropped", "data_position")
    return [{k: record[k] for k in keys}
            for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def _copy_run(source, target, keep_steps):
    shutil.copytree(source, target)
    for entry in os.listdir(target / "checkpoints"):
        if int(entry[5:13]) not in keep_steps:
            os.unlink(target / "checkpoints" / entry)


@pytest.mark.slow
def test_resume_survives_every_kind_of_crash_leftover_and_matches_the_straight_run(tmp_path):
    config = _config(steps=8, checkpoint_interval=2, keep_checkpoints=10)
    straight = tmp_path / "straight"
    _run(config, straight)
    crashed = tmp_path / "crashed"
    _copy_run(straight, crashed, keep_steps=(2, 4, 6))
    checkpoints = crashed / "checkpoints"
    newest = checkpoints / "step_00000006.ckpt"
    newest.write_bytes(newest.read_bytes()[:-100])  # killed while the weights were written: sha256 mismatch
    (checkpoints / "step_00000005.ckpt").write_bytes(b"weights renamed, sidecar never written")
    host, dead_pid = socket.gethostname().replace("-", "_"), 2 ** 22 + 17
    stale = [checkpoints / f".step_00000008.ckpt.tmp-{host}-{dead_pid}-abc.ckpt",
             checkpoints / ".step_00000008.json.tmp-oldformat",  # written by an older version
             crashed / f".metrics.jsonl.tmp-{host}-{dead_pid}-x"]
    for path in stale:
        path.write_bytes(b"partial")
    lines = (crashed / "metrics.jsonl").read_text().splitlines(keepends=True)
    (crashed / "metrics.jsonl").write_text("".join(lines[:7]) + lines[7][:25])  # killed mid-line at step 8
    summary, log = _run(config, crashed, resume="auto")
    assert summary.resumed_from == 4
    assert any("skipping checkpoint step 6" in line for line in log)
    assert any("dropped 1 unreadable line" in line for line in log)
    assert _metrics(crashed) == _metrics(straight)
    assert not any(path.exists() for path in stale)
    assert not (checkpoints / "step_00000005.ckpt").exists()
    for step in (6, 8):
        a = ckpt.load_parameters(ckpt.read_checkpoint(str(straight / "checkpoints" / f"step_{step:08d}.json")))
        b = ckpt.load_parameters(ckpt.read_checkpoint(str(checkpoints / f"step_{step:08d}.json")))
        for name in a:
            assert np.array_equal(a[name].asnumpy(), b[name].asnumpy()), (step, name)


@pytest.mark.parametrize("section,key,value", [
    ("moe", "routing_seed", 99), ("data", "seed", 5), ("moe", "table_balance", "uniform"),
    ("model", "dropout_rate", 0.2),
])
def test_resume_refuses_a_different_experiment(two_step_run, tmp_path, section, key, value):
    out = _copy_of(two_step_run, tmp_path)
    config = _config(steps=4)
    changed = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{key: value})})
    with pytest.raises(DataError, match=rf"differs from the checkpoint's in {section}\.{key} "):
        _run(changed, out, resume="auto")


def test_a_resumed_run_plans_capacity_with_the_checkpoints_routing_tables(two_step_run, tmp_path):
    from mindformers_sigma.model.pangu_sigma import routing_tables_of
    from mindformers_sigma.distributed.topology import Topology
    from mindformers_sigma.training.resume import choose_start
    from mindformers_sigma.training.trainer import build_or_restore
    from mindformers_sigma.training.training_data import open_training_data

    config = _config(steps=6)
    info = choose_start(str(two_step_run), "auto", False, print)
    saved = [v.asnumpy() for k, v in ckpt.load_parameters(info).items() if k.endswith("routing_table")]
    changed = dataclasses.replace(config, moe=dataclasses.replace(config.moe, routing_seed=7))
    log = []
    step_cell, planner, _ = build_or_restore(changed, open_training_data(changed), Topology(), info, True,
                                             log.append)
    assert any("--allow-config-change" in line for line in log)
    assert len(saved) == len(planner.tables) == config.model.sparse_layers
    for table, used, restored in zip(saved, planner.tables, routing_tables_of(step_cell).values()):
        np.testing.assert_array_equal(used, table)
        np.testing.assert_array_equal(restored, table)
    fresh, _, _ = build_or_restore(changed, open_training_data(changed), Topology(), None, False, log.append)
    assert any((a != b).any() for a, b in zip(routing_tables_of(fresh).values(), saved))  # seed 7 does route differently


def test_resume_from_a_path_never_mixes_two_runs(pynative, two_step_run, tmp_path):
    from mindformers_sigma.training.resume import choose_start

    elsewhere = str(two_step_run / "checkpoints" / "step_00000002.ckpt")
    used = _copy_of(two_step_run, tmp_path)
    with pytest.raises(DataError, match="not empty .*starts a new run folder from it"):
        choose_start(str(used), elsewhere, False, print)
    assert choose_start(str(tmp_path / "fresh"), elsewhere, False, print).step == 2
    assert choose_start(str(used), elsewhere, True, print).step == 2  # --overwrite: the old run goes
    # A checkpoint of the folder's own run, with later ones present: refused unless --overwrite.
    own = tmp_path / "own"
    for step in (3, 6):
        _save(own / "checkpoints", step, float(step))
    with pytest.raises(DataError, match=r"holds later checkpoints \(steps 6\)"):
        choose_start(str(own), str(own / "checkpoints" / "step_00000003.ckpt"), False, print)
    assert choose_start(str(own), str(own / "checkpoints" / "step_00000003.ckpt"), True, print).step == 3


def test_a_run_refused_after_creating_its_folder_leaves_no_folder(two_step_run, tmp_path):
    config = _config(steps=4)
    changed = dataclasses.replace(config, moe=dataclasses.replace(config.moe, routing_seed=99))
    fresh = tmp_path / "fresh"
    with pytest.raises(DataError, match="moe.routing_seed"):
        _run(changed, fresh, resume=str(two_step_run / "checkpoints" / "step_00000002.ckpt"))
    assert not fresh.exists()


def test_the_data_fingerprint_is_the_samples_not_the_path_spelling(real_corpus, tmp_path):
    from mindformers_sigma.data.dataset import PreparedCorpus
    from mindformers_sigma.data.prepare import prepare_data
    from mindformers_sigma.training.training_data import content_fingerprint

    corpus, prepared = real_corpus
    text = tmp_path / "docs"
    text.mkdir()
    (text / "a.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    first, second, other = tmp_path / "p1", tmp_path / "p2", tmp_path / "p3"
    prepare_data([("code", str(text))], str(first), 16, tokenizer_path=str(prepared / "tokenizer.model"))
    prepare_data([("code", f"{tmp_path}/./docs/")], str(second), 16, tokenizer_path=str(prepared / "tokenizer.model"))
    (text / "a.txt").write_text("def g(y):\n    return y * 2\n" * 20)
    prepare_data([("code", str(text))], str(other), 16, tokenizer_path=str(prepared / "tokenizer.model"))
    fingerprints = [content_fingerprint(PreparedCorpus(str(p)).manifest) for p in (first, second, other)]
    assert (first / "manifest.json").read_bytes() != (second / "manifest.json").read_bytes()
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]
