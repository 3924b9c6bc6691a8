"""hccl_tools: golden schemas, 64-server round trip, merge rules, validation, clear errors, atomic output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mindformers_sigma.rank_table import generate
from mindformers_sigma.rank_table.cli import main_for
from mindformers_sigma.rank_table.generate import (merge_tables, parse_device_range, plan_table, read_hccn_conf,
                                                   single_server_table)
from mindformers_sigma.rank_table.schema import RankTableError, read_table_file, write_table
from mindformers_sigma.rank_table.validate import validate_table

from conftest import REPO

GOLDEN = Path(__file__).parent / "golden"
TOOLS = REPO / "hccl_tools"


def _tool(script, *args, cwd):
    return subprocess.run([sys.executable, str(TOOLS / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def _pairs(text):
    """JSON with key order kept, to compare order as well as values."""
    return json.loads(text, object_pairs_hook=lambda pairs: pairs)


def test_version_1_0_matches_golden_file_exactly(tmp_path):
    result = _tool("hccl_tools.py", "--device_num", "[0, 2)", "--visible_devices", "0,1,2,3,4,5,6,7",
                   "--server_ip", "10.0.0.1", "--hccn_conf", GOLDEN / "hccn_a.conf", "--output", tmp_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = tmp_path / "hccl_2p_01_10.0.0.1.json"
    golden = (GOLDEN / "hccl_2p_01_10.0.0.1.json").read_text()
    assert _pairs(written.read_text()) == _pairs(golden)
    assert written.read_text() == golden
    assert os.listdir(tmp_path) == [written.name]  # nothing temporary left behind


def test_version_1_2_matches_golden_file_exactly(tmp_path):
    result = _tool("hccl_tools.py", "--device_num", "[14,16)", "--visible_devices", ",".join(map(str, range(16))),
                   "--server_ip", "10.0.0.9", "--hccn_conf", GOLDEN / "hccn_a3.conf", "--version", "1.2",
                   "--super_device_ids", "37748750,37748751", "--super_pod_id", "3", "--output", tmp_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hccl_2p_1415_10.0.0.9.json").read_text() == (GOLDEN / "hccl_2p_1415_10.0.0.9.json").read_text()


def test_ranges_with_multi_digit_bounds_and_spaces():
    assert parse_device_range("[0,8)") == list(range(8))
    assert parse_device_range(" [ 8 , 16 ) ", "1.2") == list(range(8, 16))
    assert parse_device_range("[10,12)", "1.2") == [10, 11]
    with pytest.raises(RankTableError, match="range outside 0-15"):
        parse_device_range("[0,17)", "1.2")
    with pytest.raises(RankTableError, match="range outside 0-7"):
        parse_device_range("[4,9)")
    with pytest.raises(RankTableError, match="half-open range"):
        parse_device_range("0-8")


def _server_tables(tmp_path, count=64):
    """One generated table per server, from each server's own hccn.conf (like running on each host)."""
    paths = []
    for index in range(count):
        ip = f"10.1.{index // 100}.{index % 100 + 2}"
        conf = tmp_path / f"hccn_{index}.conf"
        conf.write_text("".join(f"address_{d}=172.16.{index}.{d + 10}\nnetmask_{d}=255.255.0.0\n" for d in range(8)))
        table, name = single_server_table("[0,8)", "0,1,2,3,4,5,6,7", ip, str(conf), True)
        paths.append(write_table(table, str(tmp_path / "servers"), name))
    return paths


def test_64_servers_merge_into_512_ranks_ordered_by_server_ip(tmp_path):
    paths = _server_tables(tmp_path)
    shuffled = paths[::-1]
    merged, name = merge_tables(shuffled)
    assert name == "hccl_64s_512p.json"
    assert validate_table(merged, expect_devices=512) == []
    servers = [s["server_id"] for s in merged["server_list"]]
    assert servers[:3] == ["10.1.0.2", "10.1.0.3", "10.1.0.4"] and servers[8] == "10.1.0.10"  # numeric, not text order
    ranks = [d["rank_id"] for s in merged["server_list"] for d in s["device"]]
    assert ranks == [str(r) for r in range(512)]
    assert all(isinstance(v, str) for s in merged["server_list"] for d in s["device"] for v in d.values())
    kept, _ = merge_tables(shuffled, keep_order=True)
    assert [s["server_id"] for s in kept["server_list"]] == servers[::-1]
    # The planning generator gives the same layout for the same IPs and device-IP scheme.
    planned, plan_name = plan_table(servers, 8, "172.16.{server}.{device}")
    assert plan_name == name
    assert [d["device_id"] for s in planned["server_list"] for d in s["device"]][:9] == \
        ["0", "1", "2", "3", "4", "5", "6", "7", "0"]
    assert validate_table(planned, expect_devices=512) == []


def test_merge_cli_and_validate_cli(tmp_path):
    paths = _server_tables(tmp_path, count=3)
    result = _tool("merge_hccl.py", *paths, "--output", tmp_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    merged = tmp_path / "hccl_3s_24p.json"
    ok = _tool("validate.py", merged, "--expect-devices", 24, cwd=tmp_path)
    assert ok.returncode == 0 and "valid" in ok.stdout
    wrong = _tool("validate.py", merged, "--expect-devices", 16, cwd=tmp_path)
    assert wrong.returncode == 1 and "24 devices, expected 16" in wrong.stdout
    same_via_cli = subprocess.run([sys.executable, "-m", "mindformers_sigma", "rank-table", "validate", str(merged)],
                                  capture_output=True, text=True, cwd=REPO)
    assert same_via_cli.returncode == 0


def test_merge_refuses_overlaps(tmp_path):
    paths = _server_tables(tmp_path, count=2)
    with pytest.raises(RankTableError, match="server 10.1.0.2 is already in"):
        merge_tables([paths[0], paths[1], paths[0]])
    clash = json.loads(Path(paths[1]).read_text())
    clash["server_list"][0]["server_id"] = "10.9.9.9"
    clash["server_list"][0]["device"][3]["device_ip"] = "172.16.0.13"  # server 0's device 3
    clash_path = tmp_path / "clash.json"
    clash_path.write_text(json.dumps(clash))
    with pytest.raises(RankTableError, match="device IP 172.16.0.13 is already used"):
        merge_tables([paths[0], str(clash_path)])


def test_validator_reports_each_problem_with_its_location():
    table = json.loads((GOLDEN / "hccl_2p_01_10.0.0.1.json").read_text())
    server = table["server_list"][0]
    server["device"].append({"device_id": "9", "device_ip": "192.168.100.101", "rank_id": "5"})
    server["device"].append({"device_id": "1", "device_ip": "192.168.1.300", "rank_id": 2})
    table["server_count"] = "2"
    table["status"] = "pending"
    problems = validate_table(table)
    expected = [
        "status: 'pending', expected 'completed'",
        "server_count: '2' but server_list has 1 servers",
        "server_list[0].device[2].device_id: 9 outside 0-7 for version 1.0",
        "server_list[0].device[2].device_ip: 192.168.100.101 already used at server_list[0].device[0]",
        "server_list[0].device[3].device_id: 1 already used at server_list[0].device[1]",
        "server_list[0].device[3].device_ip: '192.168.1.300' is not a valid IPv4 address string",
        "server_list[0].device[3].rank_id: 2 must be a string of ASCII digits without a leading zero",
        "rank_id: not contiguous from 0 over 3 devices (missing [2])",
    ]
    assert problems == expected


@pytest.mark.parametrize("field,value", [("rank_id", "\u0663"), ("device_id", "\uff13"), ("device_id", "03")])
def test_ids_must_be_plain_ascii_digits(field, value):
    table = json.loads((GOLDEN / "hccl_2p_01_10.0.0.1.json").read_text())
    table["server_list"][0]["device"][1][field] = value
    assert any(f"device[1].{field}: {value!r} must be a string of ASCII digits" in p for p in validate_table(table))


def test_version_1_2_requires_super_device_id(tmp_path):
    table = json.loads((GOLDEN / "hccl_2p_1415_10.0.0.9.json").read_text())
    del table["server_list"][0]["device"][1]["super_device_id"]
    assert validate_table(table) == [
        "server_list[0].device[1].super_device_id: missing (required by version 1.2 / Atlas A3)"]
    with pytest.raises(RankTableError, match="--super_device_ids: required for version 1.2"):
        single_server_table("[14,16)", ",".join(map(str, range(16))), "10.0.0.9", str(GOLDEN / "hccn_a3.conf"),
                            True, "1.2")


BAD_INPUTS = [
    # (what the hccn.conf holds, generate arguments, message)
    ("address_0=192.168.0.1\n", {}, "no address_1 line (device 1 is requested)"),
    ("address_0=192.168.0.1\naddress_0=192.168.0.2\naddress_1=192.168.0.3\n", {}, "address_0 given twice"),
    ("address_0=192.168.0.1\naddress_1=192.168.0.999\n", {}, "address_1=192.168.0.999 is not a valid IPv4"),
    ("", {}, "file is empty"),
    (b"address_0=192.168.0.1\n\xff\xfe\n", {}, "not UTF-8"),
    ("address_0=192.168.0.1\naddress_1=192.168.0.2\n", {"server_ip": "127.0.0.1"}, "loopback"),
    ("address_0=192.168.0.1\naddress_1=192.168.0.2\n", {"server_ip": "10.0.0"}, "not an IPv4 address"),
    ("address_0=192.168.0.1\naddress_1=192.168.0.2\n", {"device_num": "[0,17)"}, "range outside 0-7"),
    ("address_0=192.168.0.1\naddress_1=192.168.0.2\n", {"visible_devices": "0"}, "device 1 is not in --visible_devices"),
    ("address_0=192.168.0.1\naddress1=192.168.0.2\n", {}, "hccn.conf:2: 'address1=192.168.0.2' is not a setting"),
]


@pytest.mark.parametrize("conf,overrides,message", BAD_INPUTS)
def test_bad_generate_input_gets_one_clear_line_and_no_file(tmp_path, conf, overrides, message):
    conf_path = tmp_path / "hccn.conf"
    conf_path.write_bytes(conf if isinstance(conf, bytes) else conf.encode())
    args = {"device_num": "[0,2)", "visible_devices": "0,1", "server_ip": "10.0.0.1", **overrides}
    out = tmp_path / "out"
    result = _tool("hccl_tools.py", *[x for k, v in args.items() for x in (f"--{k}", v)],
                   "--hccn_conf", conf_path, "--output", out, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.parametrize("content,message", [
    (b"", "file is empty"), (b"\xff\xfe{}", "not UTF-8"), (b"{\"version\": ", "not valid JSON"),
])
def test_bad_rank_table_files(tmp_path, content, message):
    path = tmp_path / "table.json"
    path.write_bytes(content)
    with pytest.raises(RankTableError, match=message):
        read_table_file(str(path))
    result = _tool("validate.py", path, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_guessed_server_ip_is_used_only_with_a_warning(monkeypatch):
    warnings = []
    monkeypatch.setattr(generate.socket, "gethostbyname", lambda name: "10.20.30.40")
    assert generate.guess_server_ip(warnings.append) == "10.20.30.40"
    assert len(warnings) == 1 and "warning" in warnings[0] and "10.20.30.40" in warnings[0]
    monkeypatch.setattr(generate.socket, "gethostbyname", lambda name: "127.0.1.1")
    with pytest.raises(RankTableError, match="pass --server_ip"):
        generate.guess_server_ip(warnings.append)


def test_device_ip_scheme_is_a_template_not_code():
    with pytest.raises(RankTableError, match="unknown field"):
        plan_table(["10.0.0.1"], 8, "192.168.{__import__}.{device}")
    with pytest.raises(RankTableError, match="not an IPv4 address"):
        plan_table(["10.0.0.1"], 8, "192.168.{device}")
    with pytest.raises(RankTableError, match="already used"):
        plan_table(["10.0.0.1", "10.0.0.2"], 8, "192.168.0.{device}")  # same device IPs on both servers


def test_launcher_refuses_an_invalid_rank_table(tmp_path):
    import yaml

    from conftest import tiny_raw

    raw = tiny_raw()
    raw["parallel"].update(mode="hybrid_parallel", device_num=2, data_parallel=2)
    raw["context"]["device_target"] = "Ascend"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    table = json.loads((GOLDEN / "hccl_2p_01_10.0.0.1.json").read_text())
    table["server_list"][0]["device"][1]["device_ip"] = table["server_list"][0]["device"][0]["device_ip"]
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(table))
    result = subprocess.run(["bash", str(REPO / "run" / "distributed_train.sh"), "--rank-table", str(path),
                             "--devices", "2", "--dry-run", str(config)], capture_output=True, text=True, cwd=REPO,
                            env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable})
    assert result.returncode == 2 and result.stdout == ""
    assert "device_ip: 192.168.100.101 already used" in result.stderr


def _in_process(tool, *args, capsys):
    """Exit code, stdout and stderr of one tool run in this process (no interpreter start-up to wait for)."""
    try:
        code = main_for(tool, [str(arg) for arg in args], prog=tool)
    except SystemExit as stop:  # argparse refusing an argument
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# The lines of a real hccn.conf (Atlas A3, 16 devices), CRLF line ends and a byte-order mark as a Windows editor leaves.
REALISTIC_HCCN_CONF = ("\ufeff# written by hccn_tool\r\n" + "".join(
    f"address_{d}=192.168.{100 + d}.9\r\nnetmask_{d}=255.255.255.0\r\nnetdetect_{d}=192.168.{100 + d}.1\r\n"
    f"gateway_{d}=192.168.{100 + d}.1\r\nsend_arp_status_{d}=1\r\ntls_enable_{d}=0\r\n"
    f"ip_rule_{d}=add from 192.168.{100 + d}.9 table {100 + d}\r\n\r\n" for d in range(16)))


def test_realistic_hccn_conf_gives_every_device_ip(tmp_path):
    path = tmp_path / "hccn.conf"
    path.write_text(REALISTIC_HCCN_CONF, encoding="utf-8", newline="")
    assert read_hccn_conf(str(path), "1.2") == {d: f"192.168.{100 + d}.9" for d in range(16)}
    with pytest.raises(RankTableError, match=r"hccn.conf:66: address_8: device 8 outside 0-7 for version 1.0; "
                                             r".*--version 1.2"):
        read_hccn_conf(str(path), "1.0")  # an A3 server's file used for an 8-device table


@pytest.mark.parametrize("lines,version,message", [
    ("address_0 192.168.0.3", "1.0", "3: 'address_0 192.168.0.3' is not a setting; expected KEY_N=VALUE like "
                                     "address_0=192.168.100.101"),
    ("address=192.168.0.3", "1.0", "3: 'address=192.168.0.3' is not a setting"),
    ("=192.168.0.3", "1.0", "3: '=192.168.0.3' is not a setting"),
    ("netmask_1=", "1.0", "3: 'netmask_1=' is not a setting"),
    ("tls_enable_9=0", "1.0", "3: tls_enable_9: device 9 outside 0-7 for version 1.0"),
    ("gateway_16=192.168.0.1", "1.2", "3: gateway_16: device 16 outside 0-15 for version 1.2; remove the line"),
    ("netmask_0=255.255.255.999", "1.0", "3: netmask_0=255.255.255.999 is not a valid IPv4 address"),
    ("netdetect_1=192.168.1.1\nnetdetect_1=192.168.1.2", "1.0", "4: netdetect_1 given twice (also line 3)"),
    ("address_01=192.168.0.9", "1.0", "3: address_01 given twice (also line 2)"),
])
def test_hccn_conf_lines_are_checked_one_by_one(tmp_path, capsys, lines, version, message):
    path = tmp_path / "hccn.conf"
    path.write_text(f"address_0=192.168.0.1\naddress_1=192.168.0.2\n{lines}\n")
    a3 = ["--super_device_ids", "1,2"] if version == "1.2" else []
    code, out, err = _in_process("generate", "--device_num", "[0,2)", "--server_ip", "10.0.0.1", "--hccn_conf", path,
                                 "--version", version, *a3, "--output", tmp_path / "out", capsys=capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"generate: error: {path}:{message}"), err
    assert not (tmp_path / "out").exists()


def _files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("variant", ["regular_file", "under_regular_file", "table_name_is_a_folder", "read_only"])
def test_unusable_output_folder_is_one_clear_error_and_leaves_nothing(tmp_path, variant):
    table = json.loads((GOLDEN / "hccl_2p_01_10.0.0.1.json").read_text())
    name = "hccl_2p_01_10.0.0.1.json"
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder\n")
    output, reason = blocker, f"{blocker} is a file, not a folder"
    if variant == "under_regular_file":
        output = blocker / "tables"
    elif variant == "table_name_is_a_folder":
        output = tmp_path / "out"
        (output / name).mkdir(parents=True)
        reason = f"{output / name} is a folder"
    elif variant == "read_only":
        output = tmp_path / "read_only"
        output.mkdir(mode=0o555)
        if os.access(output, os.W_OK):
            pytest.skip("running as root: a read-only folder still takes writes")
        reason = "Permission denied"
    before = _files_under(tmp_path)
    with pytest.raises(RankTableError) as caught:
        write_table(table, str(output), name)
    assert str(caught.value) == f"--output {output}: cannot write there ({reason}); pass a writable folder"
    assert _files_under(tmp_path) == before  # no temporary file, no half-written table


@pytest.mark.parametrize("command,under_file", [
    (["hccl_tools/hccl_tools.py"], False), (["hccl_tools/hccl_tools.py"], True),
    (["-m", "mindformers_sigma", "rank-table", "generate"], False),
    (["-m", "mindformers_sigma", "rank-table", "generate"], True),
    (["hccl_tools/merge_hccl.py"], False), (["hccl_tools/plan_cluster.py"], False),
])
def test_every_tool_reports_an_unusable_output_folder_in_one_line(tmp_path, command, under_file):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder\n")
    output = blocker / "tables" if under_file else blocker
    tool_args = {
        "generate": ["--device_num", "[0,2)", "--server_ip", "10.0.0.1", "--hccn_conf", GOLDEN / "hccn_a.conf"],
        "merge_hccl.py": [GOLDEN / "hccl_2p_01_10.0.0.1.json"],
        "plan_cluster.py": ["--server-ips", "10.0.0.1,10.0.0.2"],
    }
    key = "generate" if command[-1] in ("generate", "hccl_tools/hccl_tools.py") else Path(command[-1]).name
    result = subprocess.run([sys.executable, *command, *map(str, tool_args[key]), "--output", str(output)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert f"--output {output}: cannot write there ({blocker} is a file, not a folder); pass a writable folder" \
        in result.stderr
    assert _files_under(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("count", ["-1", "0"])
def test_expected_device_count_must_be_positive(capsys, count):
    code, out, err = _in_process("validate", GOLDEN / "hccl_2p_01_10.0.0.1.json", "--expect-devices", count,
                                 capsys=capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"validate: error: argument --expect-devices: expected a positive integer, "
                                f"got {count!r} (see --help)"]


@pytest.mark.parametrize("content,message", [
    ("10.0.0.1\n10.0.0.2 10.0.0.3\n", "ips.txt:2: '10.0.0.2 10.0.0.3': not an IPv4 address"),
    ("10.0.0.1\n\n10.0.0.1\n", "ips.txt:3: 10.0.0.1 already listed on line 1; list each server once"),
    ("10.0.0.1\n127.0.0.1\n", "ips.txt:2: 127.0.0.1: a loopback/unspecified/multicast address"),
    ("# no servers yet\n", "ips.txt: no server IPs; write one IP per line"),
    (b"10.0.0.1\n\xff\n", "ips.txt: not UTF-8 (byte 9)"),
    (None, "ips.txt: cannot read server IP list (Is a directory); check the path"),
])
def test_server_ips_file_problems_name_the_line(tmp_path, capsys, content, message):
    path = tmp_path / "ips.txt"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, out, err = _in_process("plan", "--server-ips-file", path, "--output", tmp_path / "out", capsys=capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"plan: error: {tmp_path}/{message}"), err
    assert not (tmp_path / "out").exists()


def test_server_ips_file_takes_indented_comments_and_blank_lines(tmp_path, capsys):
    path = tmp_path / "ips.txt"
    path.write_text("# rack 1\n10.0.0.1\n\n    # rack 2\n  10.0.0.2  \n")
    code, out, err = _in_process("plan", "--server-ips-file", path, "--output", tmp_path, capsys=capsys)
    assert (code, err) == (0, "")
    table = json.loads((tmp_path / "hccl_2s_16p.json").read_text())
    assert [s["server_id"] for s in table["server_list"]] == ["10.0.0.1", "10.0.0.2"]


@pytest.mark.parametrize("server_ips,message", [
    ("10.0.0.1 10.0.0.2", "--server-ips '10.0.0.1 10.0.0.2': not an IPv4 address"),
    ("10.0.0.1,10.0.0.2,10.0.0.1", "--server-ips: 10.0.0.1 is listed twice; list each server once"),
])
def test_server_ips_problems_name_the_flag(tmp_path, capsys, server_ips, message):
    code, out, err = _in_process("plan", "--server-ips", server_ips, "--output", tmp_path, capsys=capsys)
    assert code == 2 and err.splitlines() == [f"plan: error: {message}"]


@pytest.mark.parametrize("arguments,message", [
    (["--super_device_ids", "1,2"], "--super_device_ids: only for --version 1.2 (Atlas A3); drop it or add --version "
                                    "1.2"),
    (["--super_pod_id", "3"], "--super_pod_id: only for --version 1.2 (Atlas A3); drop it or add --version 1.2"),
    (["--version", "1.2", "--super_device_ids", "1,2", "--super_pod_id", "x"],
     "--super_pod_id 'x': expected a non-negative integer like 0"),
    (["--version", "1.2", "--super_device_ids", "2,-1"],
     "--super_device_ids '2,-1': expected comma-separated non-negative integers like \"0,1,2,3\""),
    (["--visible_devices", "0,1,1_0"],
     "--visible_devices '0,1,1_0': expected comma-separated non-negative integers like \"0,1,2,3\""),
    (["--visible_devices", "0,1,8"], "--visible_devices '0,1,8': device 8 outside 0-7 for version 1.0"),
])
def test_generate_refuses_arguments_it_would_ignore_or_misread(tmp_path, capsys, arguments, message):
    code, out, err = _in_process("generate", "--device_num", "[0,2)", "--server_ip", "10.0.0.1", "--hccn_conf",
                                 GOLDEN / "hccn_a.conf", *arguments, "--output", tmp_path / "out", capsys=capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"generate: error: {message}"]
    assert not (tmp_path / "out").exists()


def _a3_table():
    return json.loads((GOLDEN / "hccl_2p_1415_10.0.0.9.json").read_text())


@pytest.mark.parametrize("super_pod_list,problem", [
    ("x", "super_pod_list: must be a non-empty list of super pods"),
    ([{"super_pod_id": "0", "server_list": 5}], "super_pod_list[0].server_list: must be a non-empty list of servers"),
    ([{"super_pod_id": "0", "server_list": [{"server_id": []}]}],
     "super_pod_list[0].server_list[0].server_id: [] is not in server_list"),
    ([{"super_pod_id": "0", "server_list": [{"server_id": "10.0.0.9", "rack": "1"}]}],
     "super_pod_list[0].server_list[0].rack: unknown key"),
    ([{"super_pod_id": "0", "server_list": [{"server_id": "10.0.0.9"}], "size": "1"}],
     "super_pod_list[0].size: unknown key"),
    ([{"super_pod_id": "0", "server_list": [{"server_id": "10.0.0.9"}]}, {"super_pod_id": "0", "server_list": []}],
     "super_pod_list[1].super_pod_id: 0 already used at super_pod_list[0]"),
])
def test_malformed_super_pod_list_is_a_problem_not_a_crash(tmp_path, super_pod_list, problem):
    table = _a3_table()
    table["super_pod_list"] = super_pod_list
    assert problem in validate_table(table)
    path = tmp_path / "a3.json"
    path.write_text(json.dumps(table))
    with pytest.raises(RankTableError, match=re.escape(f"{path}: ")):
        merge_tables([str(path)])


@pytest.mark.parametrize("text,message", [
    ('{"version": "1.0", "version": "1.2"}', "key 'version' appears twice in one object; keep one"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_rank_table_json_that_would_be_misread_or_crash(tmp_path, text, message):
    path = tmp_path / "table.json"
    path.write_text(text)
    with pytest.raises(RankTableError, match=re.escape(f"{path}: {message}")):
        read_table_file(str(path))
