"""The README and the docs say what the code and the latest benchmark record say."""

from __future__ import annotations

import json
import re

import pytest

from conftest import CONFIGS, REPO
from mindformers_sigma.benchmarks.doc_blocks import blocks, parse_blocks, render
from mindformers_sigma.benchmarks.suite import PARTS

RECORD = REPO / "bench" / "results" / "suite" / "bench.json"
DOCUMENTS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
# where benchmark figures belong: outside its blocks, none of these may quote one
PERFORMANCE_DOCS = ("README.md", "benchmarks.md", "ecss.md", "lifecycle.md", "PERFORMANCE.md")
BENCH_FIGURE = re.compile(r"\b\d[\d,]*(?:\.\d+)?\s*(?:tokens/s|GFLOP/s)|\b\d+\.\d+x\b|\bMFU \d")


@pytest.fixture(scope="module")
def record():
    return json.loads(RECORD.read_text())


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.name)
def test_every_bench_block_is_what_the_latest_record_renders(path, record):
    for name, text in blocks(path.read_text(encoding="utf-8")).items():
        assert text == render(name, record), (
            f"{path.name}: block {name!r} differs from {RECORD.relative_to(REPO)}; regenerate it with "
            f"pangu-sigma bench --record {RECORD.relative_to(REPO)} --docs {path.relative_to(REPO)}")


def test_the_figures_have_blocks_and_the_record_is_a_full_run(record):
    assert not record["quick"] and set(record["parts"]) == set(PARTS)
    assert "headline" in blocks((REPO / "README.md").read_text())
    assert set(blocks((REPO / "docs" / "benchmarks.md").read_text())) == set(PARTS)
    headline = render("headline", record)
    assert headline.count("\n| ") >= 10  # a row for every headline figure: each part it names is in the record


@pytest.mark.parametrize("name", PERFORMANCE_DOCS)
def test_no_benchmark_figure_is_quoted_outside_a_block(name):
    path = REPO / name if name == "README.md" else REPO / "docs" / name
    text = path.read_text(encoding="utf-8")
    for block in reversed(parse_blocks(text, name)):
        text = text[:block.start] + text[block.end:]
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    quoted = [line.strip() for line in text.splitlines() if BENCH_FIGURE.search(line)]
    assert quoted == [], f"{name}: put benchmark figures in a <!-- bench:NAME --> block"
    assert BENCH_FIGURE.search("decoding is 9.1x faster, 2,351 tokens/s")  # the check can see one


def test_the_readme_is_short_and_links_what_it_left_out():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    for doc in re.findall(r"`(docs/[a-z_]+\.md)`", readme):
        assert (REPO / doc).is_file(), doc
    assert {"docs/layout.md", "docs/benchmarks.md", "docs/configuration.md"} <= set(re.findall(r"docs/[a-z_]+\.md",
                                                                                               readme))


def test_the_readme_shows_what_params_prints(capsys):
    from mindformers_sigma.cli import main

    assert main(["params", "--config", str(CONFIGS / "pangu_sigma_1085b_512p.yaml")]) == 0
    printed = capsys.readouterr().out
    shown = (REPO / "README.md").read_text().split("$ pangu-sigma params --config ascend_configs/"
                                                   "pangu_sigma_1085b_512p.yaml\n", 1)[1].split("```", 1)[0]
    assert shown == printed


def test_the_ecss_doc_shows_what_plan_computes_for_the_512_card_config():
    from mindformers_sigma.config import load_config
    from mindformers_sigma.parallel.planner import plan_layout
    from mindformers_sigma.parallel.report import format_plan

    report = format_plan(plan_layout(load_config(CONFIGS / "pangu_sigma_1085b_512p.yaml"))).splitlines()
    shown = (REPO / "docs" / "ecss.md").read_text().split("(the ECSS lines)\n", 1)[1].split("```", 1)[0]
    assert len(shown.splitlines()) >= 6
    for line in shown.splitlines():
        assert line in report, f"docs/ecss.md: {line!r} is not what pangu-sigma plan prints; paste the new lines"


def test_the_module_map_lists_every_module_and_only_those():
    """docs/layout.md's map of mindformers_sigma/: each module once, none that does not exist."""
    text = (REPO / "docs" / "layout.md").read_text(encoding="utf-8")
    tree = text.split("## The package (`mindformers_sigma/`)", 1)[1].split("```", 2)[1]
    listed, package = set(), ""
    for line in tree.splitlines():
        if re.match(r"^[a-z_]+/(\s|$)", line):
            package = line.split("/", 1)[0] + "/"
        elif re.match(r"^[a-z_]+\.py\s", line):
            package, name = "", line.split()[0]
            listed.add(name)
        elif re.match(r"^  [a-z_]+\.py\s", line):
            listed.add(package + line.split()[0])
    actual = {path.relative_to(REPO / "mindformers_sigma").as_posix()
              for path in (REPO / "mindformers_sigma").rglob("*.py") if path.name != "__init__.py"}
    assert sorted(actual - listed) == [] and sorted(listed - actual) == []
