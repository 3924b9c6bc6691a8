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
