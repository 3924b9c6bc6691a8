"""prepare-data and the reader: round trips, domain purity, manifest counts, determinism, sharding."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mindformers_sigma.data.dataset import BLOCK, MixedCorpusSource, PreparedCorpus, SampleSchedule, batches
from mindformers_sigma.data.demo_corpus import strip_pos_tags
from mindformers_sigma.data.prepare import prepare_data, unpack_documents
from mindformers_sigma.errors import DataError
from mindformers_sigma.data.tokenizer import EOD_ID, Tokenizer, TokenizerError

from conftest import REPO

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ = 31


def _corpus_files(root: Path) -> dict:
    """Three small real domains: Python source, English prose, Chinese text, with tricky whitespace."""
    code = root / "code"
    code.mkdir()
    for module in ("textwrap.py", "bisect.py", "heapq.py"):
        (code / module.replace(".py", ".txt")).write_text((STDLIB / module).read_text())
    (code / "tabs.txt").write_text("def f():\n\tif x:\n\t\treturn  1   \n\n\n  # trailing spaces   \n")
    english = root / "en.jsonl"
    from pydoc_data.topics import topics
    english.write_text("".join(json.dumps({"text": topics[k], "source": "pydoc", "license": "PSF"}) + "\n"
                               for k in sorted(topics)[:12]))
    chinese = root / "zh.jsonl"
    lines = ["迈向充满希望的新世纪——一九九八年新年讲话", "同胞们、朋友们、女士们、先生们：\n  在这辞旧迎新的美好时刻。",
             "中国人民将在新的一年里 继续努力 🎉"]
    chinese.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines))
    return {"code": str(code), "en": str(english), "zh": str(chinese)}


def _documents(spec: str) -> list:
    path = Path(spec)
    if path.is_dir():
        return [p.read_text() for p in sorted(path.rglob("*.txt"))]
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    sources = _corpus_files(root)
    out = root / "prepared"
    manifest = prepare_data(list(sources.items()), str(out), SEQ, vocab_size=600)
    return sources, out, manifest


def test_detokenized_samples_give_back_every_document(prepared):
    sources, out, manifest = prepared
    corpus = PreparedCorpus(str(out))
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.model"))
    for domain in manifest["domains"]:
        decoded = [tokenizer.decode(doc) for doc in unpack_documents(corpus.samples[domain["id"]])]
        assert decoded == _documents(sources[domain["name"]])


def test_every_sample_has_one_domain_and_counts_match_manifest(prepared):
    from mindspore.mindrecord import FileReader

    _, out, manifest = prepared
    for domain in manifest["domains"]:
        rows = []
        for shard in domain["shards"]:
            reader = FileReader(str(out / shard["file"]))
            records = list(reader.get_next())
            reader.close()
            assert {int(r["domain_id"]) for r in records} == {domain["id"]}
            rows += [r["input_ids"] for r in records]
            assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
        samples = np.stack(rows)
        assert samples.shape == (domain["samples"], SEQ + 1)
        stream = samples.reshape(-1)
        # Documents end with EOD; the fill after the last one is EOD too and is not counted.
        last_eod = np.flatnonzero(stream == EOD_ID)
        assert int((stream == EOD_ID).sum()) >= domain["documents"]
        assert len(unpack_documents(samples)) == domain["documents"]
        real_tokens = sum(len(d) + 1 for d in unpack_documents(samples))
        assert real_tokens == domain["tokens"]
        assert np.all(stream[real_tokens:] == EOD_ID) and last_eod.size
        freq = domain["token_frequency"]
        assert sum(freq["counts"]) == domain["tokens"]
        counted = np.bincount(stream[:real_tokens], minlength=max(freq["ids"]) + 1)
        assert dict(zip(freq["ids"], freq["counts"])) == {i: int(c) for i, c in enumerate(counted) if c}
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256((out / "tokenizer.model").read_bytes()).hexdigest()
    assert {d["name"]: d["id"] for d in manifest["domains"]} == {"code": 0, "en": 1, "zh": 2}
    assert manifest["domains"][1]["provenance"] == [{"source": "pydoc", "license": "PSF", "documents": 12}]


def test_rerun_gives_identical_bytes_and_given_tokenizer_gives_same_ids(prepared, tmp_path):
    sources, out, _ = prepared
    again = tmp_path / "again"
    prepare_data(list(sources.items()), str(again), SEQ, vocab_size=600)
    assert sorted(os.listdir(out)) == sorted(os.listdir(again))
    for name in os.listdir(out):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    reused = tmp_path / "reused"
    prepare_data(list(sources.items()), str(reused), SEQ, tokenizer_path=str(out / "tokenizer.model"))
    a, b = PreparedCorpus(str(out)), PreparedCorpus(str(reused))
    for x, y in zip(a.samples, b.samples):
        np.testing.assert_array_equal(x, y)


class _FakeCorpus:
    """Sample i of domain d is the row [d, i], so batches show exactly what was read."""

    def __init__(self, sizes):
        self.samples = [np.stack([np.array([d, i], np.int32) for i in range(n)]) for d, n in enumerate(sizes)]


def _source(sizes, weights=None, seed=5):
    weights = np.asarray(sizes, np.float64) / sum(sizes) if weights is None else np.asarray(weights)
    return MixedCorpusSource(_FakeCorpus(sizes), SampleSchedule(list(sizes), weights, seed))


def test_resume_from_position_equals_uninterrupted_read():
    sizes = (50, 30, 20)
    straight = batches(_source(sizes), batch_size=7)
    reference = [next(straight) for _ in range(1300)]  # crosses several BLOCK boundaries
    assert reference[-1][2] > 2 * BLOCK
    for resume_at in (1, 585, 1000):
        position = reference[resume_at - 1][2]
        resumed = batches(_source(sizes), batch_size=7, start_position=position)
        for expected in reference[resume_at:resume_at + 20]:
            got = next(resumed)
            np.testing.assert_array_equal(got[0], expected[0])
            np.testing.assert_array_equal(got[1], expected[1])
            assert got[2] == expected[2]


def test_rank_slices_are_disjoint_and_together_are_the_single_process_batches():
    sizes = (500, 300, 200)
    single = batches(_source(sizes), batch_size=8)
    ranks = [batches(_source(sizes), batch_size=4, num_shards=2, shard_id=r) for r in range(2)]
    seen = []
    for _ in range(12):  # 96 draws: no domain finishes an epoch, so a repeat would be a bug
        whole = next(single)[0]
        parts = [next(r)[0] for r in ranks]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
        seen += [tuple(row) for part in parts for row in part]
    assert len(seen) == len(set(seen))  # disjoint: no sample read twice, by one rank or two
    # Over one equal-weight epoch the ranks together read every sample of every domain.
    ranks = [batches(_source((16, 16), seed=3), batch_size=2, num_shards=2, shard_id=r) for r in range(2)]
    covered = {tuple(row) for _ in range(40) for r in ranks for row in next(r)[0]}
    assert covered == {(d, i) for d in range(2) for i in range(16)}


def test_mixing_ratios_are_honoured():
    weights = np.array([0.6, 0.3, 0.1])
    domains, _ = SampleSchedule([50, 30, 20], weights, 5).draws(0, 20_000)
    share = np.bincount(domains, minlength=3) / domains.shape[0]
    sigma = np.sqrt(weights * (1 - weights) / domains.shape[0])
    assert np.all(np.abs(share - weights) < 4 * sigma)


def test_mixing_weights_from_config(prepared):
    _, out, _ = prepared
    corpus = PreparedCorpus(str(out))
    np.testing.assert_allclose(corpus.mixing_weights({"code": 3, "zh": 1}, "cfg.yaml"), [0.75, 0, 0.25])
    with pytest.raises(DataError, match=r"cfg.yaml: data.domain_weights.python: not a domain"):
        corpus.mixing_weights({"python": 1}, "cfg.yaml")


def test_bad_documents_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.txt").write_text("print('hello')\n" * 40)
    (folder / "empty.txt").write_text("")
    (folder / "blank.txt").write_text("  \n\n")
    (folder / "binary.txt").write_bytes(b"\x7fELF\x00\x01\x02")
    (folder / "latin1.txt").write_bytes("café".encode("latin-1"))
    (folder / "lines.jsonl").write_bytes(b'{"text": "ok line"}\nnot json\n{"no_text": 1}\n"\xff\xfe"\n')
    manifest = prepare_data([("mixed", str(folder))], str(tmp_path / "out"), 8, vocab_size=300)
    skipped = manifest["domains"][0]["skipped"]
    assert skipped == {"empty": 2, "binary": 1, "invalid_utf8": 2, "bad_json": 2}
    assert manifest["domains"][0]["documents"] == 2


@pytest.mark.parametrize("make_input,args,message", [
    (lambda p: None, {"seq_length": 1}, "--seq-length 1: must be >= 2"),
    (lambda p: None, {"spec": "missing/nowhere.txt"}, "no such file or folder"),
    (lambda p: (p / "e.txt").write_text(""), {"spec": "e.txt"}, "no usable text (skipped: empty 1)"),
    (lambda p: (p / "b.txt").write_bytes(b"\x00\x01"), {"spec": "b.txt"}, "no usable text (skipped: binary 1)"),
    (lambda p: (p / "u.txt").write_bytes(b"\xff\xfe\xfa"), {"spec": "u.txt"}, "skipped: invalid_utf8 1"),
    (lambda p: (p / "bad.model").write_bytes(b"not a model"), {"tokenizer": "bad.model"},
     "not a SentencePiece model"),
])
def test_bad_input_gives_one_clear_error_and_writes_nothing(tmp_path, make_input, args, message):
    make_input(tmp_path)
    (tmp_path / "ok.txt").write_text("some real text\n" * 30)
    spec = str(tmp_path / args.get("spec", "ok.txt"))
    kwargs = {"vocab_size": 300} if "tokenizer" not in args else {"tokenizer_path": str(tmp_path / args["tokenizer"])}
    out = tmp_path / "out"
    with pytest.raises((DataError, TokenizerError)) as info:
        prepare_data([("d", spec)], str(out), args.get("seq_length", 8), **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary left behind


def test_cli_bad_domain_argument_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mindformers_sigma", "prepare-data", "--domain", "nodelimiter",
                             "--out", str(tmp_path / "o"), "--seq-length", "8", "--vocab-size", "300"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "expected NAME=PATH" in result.stderr


def test_failed_rerun_keeps_the_previous_output(prepared, tmp_path):
    sources, out, _ = prepared
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    with pytest.raises(DataError):
        prepare_data([("code", sources["code"]), ("broken", str(tmp_path / "none.txt"))], str(out), SEQ,
                     vocab_size=600)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_strip_pos_tags():
    line = "迈向/v  充满/v  希望/n  [中央/n  人民/n  广播/vn  电台/n]nt  １２月/t  ，/w"
    assert strip_pos_tags(line) == "迈向充满希望中央人民广播电台１２月，"
