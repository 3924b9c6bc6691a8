"""The launcher walk-throughs of docs/training.md are what `--dry-run` prints today."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from conftest import REPO
from launcher_helpers import launcher

DOC = REPO / "docs" / "training.md"
SHOWN_CHECKOUT = "/opt/mindformers_sigma"
SHOWN_VENV_BIN = f"{SHOWN_CHECKOUT}/.venv/bin"


def _console_examples():
    """(command, expected lines) for every `$ bash run/distributed_train.sh` line of a console block."""
    examples, current, in_console = [], None, False
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            in_console = line == "```console"
            current = None
            continue
        if not in_console:
            continue
        if line.startswith("$ "):
            current = None
            if line.startswith("$ bash run/distributed_train.sh "):
                current = (line[len("$ bash run/distributed_train.sh "):], [])
                examples.append(current)
        elif current is not None:
            current[1].append(line)
    return examples


def _write_rank_tables(folder):
    """The tables the walk-through generates, made with the project's own generator and merger."""
    from mindformers_sigma.rank_table.generate import merge_tables, single_server_table
    from mindformers_sigma.rank_table.schema import write_table

    folder.mkdir()
    files = []
    for server in (1, 2):
        hccn = folder.parent / f"hccn_{server}.conf"
        hccn.write_text("".join(f"address_{d}=192.168.{server}.{d + 10}\nnetmask_{d}=255.255.255.0\n"
                                for d in range(8)))
        table, name = single_server_table("[0,8)", "0,1,2,3,4,5,6,7", f"10.0.0.{server}", str(hccn), True, "1.0",
                                          None, None)
        files.append(write_table(table, str(folder), name))
    table, name = merge_tables(files, False)
    write_table(table, str(folder), name)


def test_the_walk_throughs_match_the_dry_run(tmp_path):
    (tmp_path / "ascend_configs").symlink_to(REPO / "ascend_configs")
    _write_rank_tables(tmp_path / "rank_tables")
    examples = _console_examples()
    assert len(examples) == 4
    for command, shown in examples:
        # This interpreter stands for the checkout's .venv the walk-through was written with.
        result = launcher(*shlex.split(command), cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable})
        assert result.returncode == 0, (command, result.stderr)
        printed = (result.stdout.replace("(chosen by PYTHON)", "(chosen by the checkout's .venv)")
                   .replace(str(Path(sys.executable).parent), SHOWN_VENV_BIN)
                   .replace(str(tmp_path), SHOWN_CHECKOUT).replace(str(REPO), SHOWN_CHECKOUT).splitlines())
        # Every shown line is printed, in order; "..." stands for lines left out.
        position = 0
        for line in shown:
            if line == "...":
                continue
            assert line in printed[position:], (command, line, printed)
            position = printed.index(line, position) + 1
        if "..." not in shown:
            assert printed == shown, command
