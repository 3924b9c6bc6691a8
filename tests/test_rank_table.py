"""hccl_tools: golden schemas, 64-server round trip, merge rules, validation, clear errors, atomic output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mindformers_sigma.rank_table import generate
from mindformers_sigma.rank_table.generate import merge_tables, parse_device_range, plan_table, single_server_table
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
        "server_list[0].device[3].rank_id: 2 must be a string of digits",
        "rank_id: not contiguous from 0 over 3 devices (missing [2])",
    ]
    assert problems == expected


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
    raw["parallel"].update(mode="semi_auto_parallel", device_num=2, data_parallel=2)
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
