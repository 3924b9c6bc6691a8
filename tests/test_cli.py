"""The command line's last line of defence: whatever escapes a command is one line, never a traceback."""

from __future__ import annotations

import dataclasses

import pytest

from mindformers_sigma import cli
from mindformers_sigma.parallel import command as parallel_commands


def _params_runs(monkeypatch, run):
    """`pangu-sigma params` runs ``run`` instead of counting."""
    monkeypatch.setattr(parallel_commands, "COMMANDS", tuple(
        dataclasses.replace(command, run=run) if command.name == "params" else command
        for command in parallel_commands.COMMANDS))


@pytest.mark.parametrize("error,code,words", [
    (PermissionError(13, "Permission denied", "/data/x.json"), 2, ["/data/x.json: Permission denied"]),
    (MemoryError(), 2, ["out of memory"]),
    (RuntimeError("kernel said no\nsecond line"), 1, ["internal error: RuntimeError: kernel said no",
                                                       "PANGU_SIGMA_TRACEBACK=1"]),
])
def test_unexpected_failures_are_one_line(monkeypatch, capsys, error, code, words):
    def fail(args):
        raise error

    monkeypatch.delenv("PANGU_SIGMA_TRACEBACK", raising=False)
    _params_runs(monkeypatch, fail)
    assert cli.main(["params", "--config", "any.yaml"]) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv("PANGU_SIGMA_TRACEBACK", "1")
    _params_runs(monkeypatch, lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["params", "--config", "any.yaml"])


def test_an_output_that_cannot_be_written_is_named_not_its_temporary(tmp_path):
    from mindformers_sigma.atomic import write_bytes_atomic

    target = tmp_path / "missing" / "out.json"
    with pytest.raises(OSError) as caught:
        write_bytes_atomic(str(target), b"{}")
    assert caught.value.filename == str(target)

    def disk_full(path, data):  # a writer failing inside the temporary file
        raise OSError(28, "No space left on device")

    from mindformers_sigma import atomic

    with pytest.raises(OSError) as caught:
        with atomic.atomic_file(str(tmp_path / "out.json")) as tmp:
            disk_full(tmp, b"")
    assert caught.value.filename == str(tmp_path / "out.json") and list(tmp_path.iterdir()) == []


def test_a_reader_that_leaves_early_is_not_an_error(monkeypatch, capsys):
    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    _params_runs(monkeypatch, broken)
    assert cli.main(["params", "--config", "any.yaml"]) == 0
    assert capsys.readouterr().err == ""


def _command_paths(parser, path=()):
    """Every command and sub-command of ``parser`` as its words on the command line."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield path + (name,)
                yield from _command_paths(sub, path + (name,))


def test_every_command_and_sub_command_prints_its_help(capsys):
    """`--help` formats each command's help with %-expansion: a bare '%' in any help text was a crash."""
    paths = list(_command_paths(cli.build_parser()))
    assert ("eval", "zeroshot") in paths and ("rank-table", "merge") in paths and len(paths) >= 19
    for path in [()] + paths:
        with pytest.raises(SystemExit) as done:
            cli.main([*path, "--help"])
        assert done.value.code == 0, path
        assert "usage: pangu-sigma" in capsys.readouterr().out
