"""prepare-data --holdout: whole documents per domain set aside, deterministically, never read by training."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from mindformers_sigma.data.dataset import PreparedCorpus
from mindformers_sigma.data.prepare import prepare_data, unpack_documents
from mindformers_sigma.errors import DataError
from mindformers_sigma.tokenizer.sentencepiece_bpe import Tokenizer

from conftest import micro_config


def _sources(root: Path) -> dict:
    """Three domains of distinct real documents (each domain's documents all different)."""
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "code").mkdir()
    for name in ("bisect.py", "heapq.py", "colorsys.py", "keyword.py", "fnmatch.py", "glob.py"):
        (root / "code" / (name + ".txt")).write_text((stdlib / name).read_text())
    (root / "en.jsonl").write_text("".join(json.dumps({"text": topics[name][:500]}) + "\n"
                                           for name in sorted(topics)[:30]))
    (root / "zh.jsonl").write_text("".join(json.dumps({"text": f"第{i}篇：迈向充满希望的新世纪，继续努力。"}, ensure_ascii=False)
                                           + "\n" for i in range(12)))
    return {"code": str(root / "code"), "en": str(root / "en.jsonl"), "zh": str(root / "zh.jsonl")}


def _documents(corpus: PreparedCorpus, tokenizer: Tokenizer, domain: int) -> list:
    return [tokenizer.decode(doc) for doc in unpack_documents(corpus.samples[domain])]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("holdout")
    sources = _sources(root)
    out = root / "prepared"
    manifest = prepare_data(list(sources.items()), str(out), 16, vocab_size=400, holdout=0.25, holdout_seed=3)
    return root, sources, out, manifest


def test_held_out_documents_are_whole_and_never_in_the_training_shards(prepared):
    root, sources, out, manifest = prepared
    train, heldout = PreparedCorpus(str(out)), PreparedCorpus(str(out), split="heldout")
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.model"))
    for domain, (name, total) in enumerate((("code", 6), ("en", 30), ("zh", 12))):
        seen, held = _documents(train, tokenizer, domain), _documents(heldout, tokenizer, domain)
        assert len(held) == round(0.25 * total) and len(seen) == total - len(held)
        assert not set(seen) & set(held)
        entry = manifest["domains"][domain]
        assert entry["heldout"]["documents"] == len(held) and entry["documents"] == len(seen)
    # what training reads: only training samples
    config = micro_config(model={"vocab_size": 512}, moe={"num_domains": 3, "num_experts": 6, "experts_per_domain": 2},
                          data={"source": "mindrecord", "path": str(out)})
    from mindformers_sigma.training.training_data import open_training_data

    read, _ = open_training_data(config).source.read(0, 400)
    training_rows = {row.tobytes() for samples in train.samples for row in samples}
    heldout_rows = {row.tobytes() for samples in heldout.samples for row in samples}
    assert all(row.tobytes() in training_rows for row in read)
    assert not any(row.tobytes() in heldout_rows - training_rows for row in read)


def test_the_split_is_a_function_of_the_seed(prepared, tmp_path):
    root, sources, out, manifest = prepared
    again = prepare_data(list(sources.items()), str(tmp_path / "again"), 16, vocab_size=400, holdout=0.25,
                         holdout_seed=3)
    assert [d["heldout"]["shards"][0]["sha256"] for d in again["domains"]] == \
           [d["heldout"]["shards"][0]["sha256"] for d in manifest["domains"]]
    other = prepare_data(list(sources.items()), str(tmp_path / "other"), 16, tokenizer_path=str(out / "tokenizer.model"),
                         holdout=0.25, holdout_seed=4)
    assert [d["heldout"]["shards"][0]["sha256"] for d in other["domains"]] != \
           [d["heldout"]["shards"][0]["sha256"] for d in manifest["domains"]]


def test_no_held_out_split_and_a_damaged_one_are_one_line_errors(prepared, tmp_path, real_corpus):
    _, without = real_corpus
    with pytest.raises(DataError, match=r"has no held-out split; rerun prepare-data with --holdout"):
        PreparedCorpus(str(without), split="heldout")
    import shutil

    root, sources, out, manifest = prepared
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    shard = damaged / manifest["domains"][1]["heldout"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"heldout-001-en-00000.mindrecord: shard of domain 'en' does not match"):
        PreparedCorpus(str(damaged))  # checked even when only the training split is read
    with pytest.raises(DataError, match=r"--holdout 1.0: must be a fraction in \[0, 1\)"):
        prepare_data(list(sources.items()), str(tmp_path / "x"), 16, vocab_size=400, holdout=1.0)


def test_a_domain_too_small_to_hold_out_from_is_a_warning_naming_it(tmp_path, capsys):
    from mindformers_sigma.cli import main

    sources = _sources(tmp_path)
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "the only document of this domain"}) + "\n")
    args = ["prepare-data", "--out", str(tmp_path / "out"), "--seq-length", "16", "--vocab-size", "400",
            "--holdout", "0.25", "--domain", f"one={tmp_path / 'one.jsonl'}"]
    for name, path in sources.items():
        args += ["--domain", f"{name}={path}"]
    assert main(args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "domain 'one' has 1 document(s), so none is held out" in warnings[0]
