"""The command line's last line of defence: whatever escapes a command is one line, never a traceback."""

from __future__ import annotations

import pytest

from mindformers_sigma import cli


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
    monkeypatch.setattr(cli, "_cmd_params", fail)
    assert cli.main(["params", "--config", "any.yaml"]) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv("PANGU_SIGMA_TRACEBACK", "1")
    monkeypatch.setattr(cli, "_cmd_params", lambda args: 1 / 0)
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

    monkeypatch.setattr(cli, "_cmd_params", broken)
    assert cli.main(["params", "--config", "any.yaml"]) == 0
    assert capsys.readouterr().err == ""
