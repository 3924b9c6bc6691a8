"""`pangu-sigma bench --quick`: every part runs and lands in one record and one table (speed is not checked)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from mindformers_sigma.benchmarks.doc_blocks import render
from mindformers_sigma.benchmarks.suite import PARTS, part_table, parts_of
from mindformers_sigma.errors import UserError


@pytest.mark.slow
def test_bench_quick_writes_every_part_into_one_record(tmp_path):
    out = tmp_path / "bench"
    docs = tmp_path / "doc.md"  # stale blocks, and text around them that must stay as it is
    docs.write_text("before\n<!-- bench:headline -->\nold\n<!-- /bench -->\nmiddle\n<!-- bench:generation -->\n"
                    "<!-- /bench -->\nafter\n")
    done = subprocess.run([sys.executable, "-m", "mindformers_sigma", "bench", "--quick", "--out", str(out),
                           "--docs", str(docs)], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "bench.json").read_text())
    assert record["quick"] and set(record["parts"]) == set(PARTS)
    for key in ("cpu_model", "cpus", "mindspore", "git_commit", "date"):
        assert record["machine"][key]
    parts = record["parts"]
    assert {"tiny", "t1"} <= set(parts["training"]["results"]) and parts["training"]["results"]["t1"]["mfu"] > 0
    assert set(parts["routers"]["results"]) == {"rre", "top1", "top2"}
    layer = parts["moe_layer"]["variants"]
    assert set(layer) == {"rre", "top1", "top2"} and layer["top1"]["speed_vs_top1"] == 1.0
    assert layer["top2"]["expert_rows_per_token"] == 2 * layer["top1"]["expert_rows_per_token"] == 2.5
    profile = parts["profile"]
    assert {"embedding", "dense_layer", "sparse_layer", "top_query_layer", "head_and_loss",
            "optimizer_update"} == set(profile["parts"])
    assert abs(sum(part["share_of_sum"] for part in profile["parts"].values()) - 1) < 1e-9
    assert profile["op_types"] and {"MatMul", "BatchMatMul"} <= {row["op_type"] for row in profile["op_types"]}
    memory = parts["memory"]
    assert {(row["case"], row["tokens"]) for row in memory["layers"]} == \
        {(kind, tokens) for kind in ("dense", "rre", "top1", "top2") for tokens in (64, 128)}
    assert memory["train"]["peak_rss_mb"] > max(row["growth_mb"] for row in memory["layers"]) > 0
    scaling = parts["parallel"]
    assert [row["workers"] for row in scaling["layouts"]] == [1, 2, 4]
    assert all(row["ratio"] == row["tokens_per_s"] / scaling["layouts"][0]["tokens_per_s"] for row in scaling["layouts"])
    # every collective of the 4 sharded workers was counted, and all but the experts' padded rows as planned
    volume = scaling["collectives"]
    assert all(row["measured_bytes"] > 0 for kind, row in volume.items() if kind != "expert_data")
    assert all(row["measured_bytes"] == row["planned_bytes"] for kind, row in volume.items() if kind != "model")
    assert abs(volume["model"]["measured_bytes"] / volume["model"]["planned_bytes"] - 1) < 0.2
    _check_ecss(parts["ecss"])
    assert parts["data"]["prepare_data_tokens_per_second"] > 0
    assert set(parts["generation"]["decoding"]) == {"1", "8"}
    assert parts["kernels"]["rows"]
    table = (out / "bench.md").read_text()
    assert all(f"## {part}" in table for part in PARTS)
    assert docs.read_text() == (f"before\n<!-- bench:headline -->\n{render('headline', record)}<!-- /bench -->\n"
                                f"middle\n<!-- bench:generation -->\n{render('generation', record)}<!-- /bench -->\n"
                                f"after\n")
    assert "| KV-cache decoding against full recompute" in render("headline", record)
    assert part_table("generation", parts["generation"]) in table


def test_a_docs_file_without_blocks_or_unwritable_is_refused_before_any_part_runs(tmp_path):
    plain = tmp_path / "plain.md"
    plain.write_text("no blocks here\n")
    for path, words in ((plain, "has no <!-- bench:NAME -->"), (tmp_path / "missing.md", "no such file")):
        done = subprocess.run([sys.executable, "-m", "mindformers_sigma", "bench", "--quick", "--out",
                               str(tmp_path / "out"), "--docs", str(path)], capture_output=True, text=True, cwd=REPO,
                              timeout=120)
        assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out" / "logs").exists()  # no part started
    assert plain.read_text() == "no blocks here\n"


def test_record_regenerates_the_blocks_of_documents_from_an_earlier_run(tmp_path):
    committed = REPO / "bench" / "results" / "suite" / "bench.json"
    doc = tmp_path / "doc.md"
    doc.write_text("text\n<!-- bench:memory -->\nstale\n<!-- /bench -->\n")
    command = [sys.executable, "-m", "mindformers_sigma", "bench", "--record", str(committed), "--docs", str(doc)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    record = json.loads(committed.read_text())
    assert doc.read_text() == f"text\n<!-- bench:memory -->\n{render('memory', record)}<!-- /bench -->\n"
    broken = tmp_path / "bench.json"
    for content, words in (("{", "cannot be read as a bench.json"), ('{"benchmark": "memory"}', "not the bench.json")):
        broken.write_text(content)
        done = subprocess.run(command[:5] + [str(broken)] + command[6:], capture_output=True, text=True, cwd=REPO,
                              timeout=120)
        assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1
    before = doc.read_text()
    lacking = dict(record, parts={name: part for name, part in record["parts"].items() if name != "memory"})
    malformed = dict(record, parts=dict(record["parts"], memory=dict(record["parts"]["memory"], train=[])))
    for content, words in ((lacking, "block 'memory' needs part(s) memory, which the record lacks"),
                           (malformed, "cannot fill block 'memory'")):
        broken.write_text(json.dumps(content))
        done = subprocess.run(command[:5] + [str(broken)] + command[6:], capture_output=True, text=True, cwd=REPO,
                              timeout=120)
        assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1
        assert doc.read_text() == before


@pytest.mark.parametrize("text,words", [
    ("<!-- bench:headline -->\nkept\n<!-- bench:data -->\nx\n<!-- /bench -->\n", "line 1: <!-- bench:headline --> has "
                                                                                   "no <!-- /bench --> before the next"),
    ("a\n<!-- bench:data -->\nx\n", "line 2: <!-- bench:data --> has no <!-- /bench -->; close it"),
    ("<!-- /bench -->\n", "line 1: <!-- /bench --> closes no block"),
    ("<!-- bench:nosuch -->\n<!-- /bench -->\n", "unknown bench block 'nosuch'"),
    ("quoted `<!-- bench:data -->` in a sentence\n", "has no <!-- bench:NAME --> ... <!-- /bench --> block"),
])
def test_a_malformed_document_is_refused_and_left_as_it_was(tmp_path, text, words):
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    done = subprocess.run([sys.executable, "-m", "mindformers_sigma", "bench", "--record",
                           str(REPO / "bench" / "results" / "suite" / "bench.json"), "--docs", str(doc)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert doc.read_text() == text


def test_a_run_that_leaves_out_a_part_a_document_needs_is_refused_before_it_runs(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text("<!-- bench:headline -->\n<!-- /bench -->\n")
    done = subprocess.run([sys.executable, "-m", "mindformers_sigma", "bench", "data", "--quick", "--out",
                           str(tmp_path / "out"), "--docs", str(doc)], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 2 and "block 'headline' needs part(s) ecss, generation, memory, moe_layer, parallel, routers, training" in done.stderr
    assert not (tmp_path / "out" / "logs").exists() and doc.read_text() == "<!-- bench:headline -->\n<!-- /bench -->\n"


def test_blocks_keep_the_documents_line_endings_and_a_symlinks_target_is_rewritten(tmp_path):
    record = json.loads((REPO / "bench" / "results" / "suite" / "bench.json").read_text())
    target = tmp_path / "real.md"
    target.write_bytes(b"top\r\n<!-- bench:data -->\r\nold\r\n<!-- /bench -->\r\nend\r\n")
    link = tmp_path / "link.md"
    link.symlink_to(target)
    done = subprocess.run([sys.executable, "-m", "mindformers_sigma", "bench", "--record",
                           str(REPO / "bench" / "results" / "suite" / "bench.json"), "--docs", str(link)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert link.is_symlink()
    expected = "top\n<!-- bench:data -->\n" + render("data", record) + "<!-- /bench -->\nend\n"
    assert target.read_bytes() == expected.replace("\n", "\r\n").encode()


def test_an_unknown_part_is_one_line():
    with pytest.raises(UserError, match=r"--only 'trainig': unknown part 'trainig'; parts: training, routers"):
        parts_of("trainig")
    assert parts_of("ecss, kernels") == ["ecss", "kernels"]


def _check_ecss(record):
    """What the ECSS part's figures must satisfy whatever the machine's speed."""
    host = record["host_adamw"]
    assert host["fused"] and host["bytes_per_parameter"] == 28 and host["numpy_bytes_per_parameter"] == 132
    assert host["gbytes_per_s"] > 0 and host["memory_gbytes_per_s"] > 0 and host["parameters"] > 0
    scaling = record["scaling"]
    assert [row["experts"] for row in scaling] == [16, 64]
    # The slab is the same size in every case and the routing tables are on the host: device
    # memory must not grow with the experts; the host store (weights, two moments) grows in proportion.
    assert scaling[0]["device_resident_bytes"] == scaling[1]["device_resident_bytes"]
    assert scaling[1]["host_resident_bytes"] == 4 * scaling[0]["host_resident_bytes"]
    comparison = record["comparison"]
    assert comparison["moe"]["device_resident_bytes"] > comparison["ecss"]["device_resident_bytes"]
    ecss = comparison["ecss"]
    assert 0 < ecss["exposed_seconds_per_step"] < ecss["step_seconds"]
    assert record["speedup_vs_moe"] == comparison["ecss"]["tokens_per_s"] / comparison["moe"]["tokens_per_s"]
    reload = record["reload"]  # 64 experts, 8 samples in 4 micro-batches: 4 x 16 in one load, or 2 x 16
    assert (reload["whole_step_slab"]["slab_experts"], reload["smallest_safe_slab"]["slab_experts"]) == (64, 32)
    assert reload["whole_step_slab"]["slab_loads_per_step"] == 1 < reload["smallest_safe_slab"]["slab_loads_per_step"]
    assert reload["smallest_safe_slab"]["device_resident_bytes"] < reload["whole_step_slab"]["device_resident_bytes"]
