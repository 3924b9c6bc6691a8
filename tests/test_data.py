"""prepare-data and the reader: round trips, domain purity, manifest counts, determinism, sharding."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
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
from mindformers_sigma.tokenizer.sentencepiece_bpe import EOD_ID, Tokenizer, TokenizerError

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
            assert shard["index_file"] == shard["file"] + ".db"
            assert hashlib.sha256((out / shard["index_file"]).read_bytes()).hexdigest() == shard["index_sha256"]
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


def _copy_of(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(out, copy)
    return copy


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage,file,problem", [
    (_flip_middle, "002-zh-00000.mindrecord", "shard of domain 'zh' does not match its sha256"),
    (_truncate, "002-zh-00000.mindrecord", "shard of domain 'zh' does not match its sha256"),
    (Path.unlink, "002-zh-00000.mindrecord", "shard of domain 'zh' listed in"),
    (Path.unlink, "002-zh-00000.mindrecord.db", "MindRecord index of the shard of domain 'zh' listed in"),
    (_flip_middle, "002-zh-00000.mindrecord.db", "MindRecord index of the shard of domain 'zh' does not match"),
    (_truncate, "tokenizer.model", "tokenizer does not match its sha256"),
])
def test_damaged_files_are_refused_before_mindspore_reads_any_shard(prepared, tmp_path, monkeypatch,
                                                                     damage, file, problem):
    import mindspore.mindrecord

    data = _copy_of(prepared[1], tmp_path)
    damage(data / file)
    # A damaged shard can crash MindSpore's reader (segmentation fault), so none may reach it first.
    monkeypatch.setattr(mindspore.mindrecord, "FileReader",
                        lambda path, *a, **k: pytest.fail(f"{path} handed to FileReader before verification"))
    with pytest.raises(DataError) as info:
        PreparedCorpus(str(data))
    message = str(info.value)
    assert message.startswith(f"{data / file}: {problem}") and message.endswith("; rerun prepare-data")
    assert "\n" not in message


def test_tokenizer_file_is_optional_for_reading(prepared, tmp_path):
    data = _copy_of(prepared[1], tmp_path)
    (data / "tokenizer.model").unlink()
    assert [s.shape[0] for s in PreparedCorpus(str(data)).samples] == [d["samples"] for d in prepared[2]["domains"]]


def _drop_last_frequency(domain: dict) -> None:
    domain["token_frequency"]["counts"].pop()


def _set_first_count(domain: dict) -> None:
    domain["token_frequency"]["counts"][0] = -1


def _add_token_past_vocabulary(domain: dict) -> None:
    domain["token_frequency"]["ids"].append(600)
    domain["token_frequency"]["counts"].append(1)


@pytest.mark.parametrize("edit,problem", [
    (lambda m: m["domains"][1].pop("shards"), "domains[1].shards: missing"),
    (lambda m: m.update(sample_length=str(SEQ + 1)), f'sample_length: is "{SEQ + 1}", expected an integer'),
    (lambda m: m.update(sample_length=SEQ + 2), f"sample_length: is {SEQ + 2}, expected seq_length + 1 = {SEQ + 1}"),
    (lambda m: m["domains"].reverse(), "domains[0].id: is 2, expected 0 (domain ids are 0..n-1 in order)"),
    (lambda m: m["domains"][0].update(id=False), "domains[0].id: is false, expected an integer"),
    (lambda m: m["domains"][2].update(name="code"), "domains[2].name: 'code' names two domains"),
    (lambda m: m["domains"][0]["shards"][0].update(file="../elsewhere.mindrecord"),
     "domains[0].shards[0].file: is \"../elsewhere.mindrecord\", expected a file name inside the folder"),
    (lambda m: m["domains"][0]["shards"][0].pop("index_sha256"), "domains[0].shards[0].index_sha256: missing"),
    (lambda m: _add_token_past_vocabulary(m["domains"][1]), "outside the tokenizer vocabulary of 600"),
    (lambda m: _set_first_count(m["domains"][1]), "domains[1].token_frequency.counts[0]: is -1, expected >= 0"),
    (lambda m: _drop_last_frequency(m["domains"][2]), "domains[2].token_frequency.counts: has"),
    (lambda m: m.update(eod_token_id=600), "eod_token_id: is 600, outside the tokenizer vocabulary of 600"),
    (lambda m: m["tokenizer"].update(trained="yes"), 'tokenizer.trained: is "yes", expected true or false'),
    (lambda m: m.update(domains={}), "domains: is {}, expected a list"),
    (lambda m: m.update(format="mindformers_sigma.prepared/1"), "written by an earlier prepare-data"),
    (lambda m: m.update(format="something/else"), "format: is \"something/else\", expected"),
])
def test_manifest_problems_are_one_line_naming_the_field(prepared, tmp_path, edit, problem):
    data = _copy_of(prepared[1], tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    edit(manifest)
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as info:
        PreparedCorpus(str(data))
    message = str(info.value)
    assert message.startswith(f"{data / 'manifest.json'}: ") and problem in message, message
    assert message.endswith("rerun prepare-data") and "\n" not in message


def test_manifest_of_a_smaller_vocabulary_than_the_samples_is_refused(prepared, tmp_path):
    data = _copy_of(prepared[1], tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 300  # the data was tokenized with 600 pieces
    for domain in manifest["domains"]:
        frequency = domain["token_frequency"]
        kept = [(i, c) for i, c in zip(frequency["ids"], frequency["counts"]) if i < 300]
        domain["token_frequency"] = {"ids": [i for i, _ in kept], "counts": [c for _, c in kept]}
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=re.escape(str(data / "000-code-00000.mindrecord")) +
                       r": token id \d+ is outside the tokenizer vocabulary of 300"):
        PreparedCorpus(str(data))


def test_reader_refuses_a_shard_of_another_domain_and_a_wrong_sample_count(prepared, tmp_path):
    data = _copy_of(prepared[1], tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["domains"][0]["shards"], manifest["domains"][1]["shards"] = (manifest["domains"][1]["shards"],
                                                                          manifest["domains"][0]["shards"])
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="001-en-00000.mindrecord: sample with domain_id 1 in the shard of domain 0"):
        PreparedCorpus(str(data))
    manifest = json.loads((prepared[1] / "manifest.json").read_text())
    manifest["domains"][2]["samples"] += 1
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"domain zh has {manifest['domains'][2]['samples'] - 1} samples, "
                                        f"manifest says {manifest['domains'][2]['samples']}"):
        PreparedCorpus(str(data))


def test_token_frequency_gives_domains_without_data_the_total(prepared):
    corpus = PreparedCorpus(str(prepared[1]))
    table = corpus.token_frequency(5, 640)
    assert table.shape == (5, 640) and not table[:, 600:].any()
    for domain in prepared[2]["domains"]:
        frequency = domain["token_frequency"]
        np.testing.assert_array_equal(table[domain["id"], frequency["ids"]], frequency["counts"])
    np.testing.assert_array_equal(table[3], table[:3].sum(0))
    np.testing.assert_array_equal(table[4], table[:3].sum(0))


def test_domain_of_several_shards_reads_back_in_order(prepared, tmp_path, monkeypatch):
    sources, out, manifest = prepared
    monkeypatch.setattr("mindformers_sigma.data.prepare.SAMPLES_PER_SHARD", 256)
    again = tmp_path / "again"
    code = prepare_data([("code", sources["code"])], str(again), SEQ, tokenizer_path=str(out / "tokenizer.model"))
    assert len(code["domains"][0]["shards"]) == -(-manifest["domains"][0]["samples"] // 256) >= 3
    corpus = PreparedCorpus(str(again))
    np.testing.assert_array_equal(corpus.samples[0], PreparedCorpus(str(out)).samples[0])


def _sentencepiece_model(**options) -> bytes:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    text = (STDLIB / "textwrap.py").read_text().splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=300,
                                   minloglevel=2, **options)
    return model.getvalue()


@pytest.mark.parametrize("options,message", [
    ({}, "<eod> has id 0, expected 6"),  # not a piece: the unknown id
    ({"user_defined_symbols": ["<mask>", "<sep>", "<eod>"]}, "<eod> has id 5, expected 6"),
    ({"user_defined_symbols": ["<mask>", "<sep>", "<eod>"], "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3},
     "model has no byte fallback"),
])
def test_tokenizer_that_breaks_eod_or_round_trips_is_refused(tmp_path, options, message):
    path = tmp_path / "other.model"
    path.write_bytes(_sentencepiece_model(**options))
    with pytest.raises(TokenizerError, match=re.escape(f"{path}: {message}")):
        Tokenizer.from_file(str(path))


def test_missing_tokenizer_file_is_one_line(tmp_path):
    with pytest.raises(TokenizerError, match=re.escape(f"{tmp_path / 'none.model'}: cannot read tokenizer")):
        Tokenizer.from_file(str(tmp_path / "none.model"))


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


def test_mixing_weight_that_is_not_finite_is_refused(prepared):
    corpus = PreparedCorpus(str(prepared[1]))
    with pytest.raises(DataError, match=r"cfg.yaml: data.domain_weights.en: inf is not a finite number"):
        corpus.mixing_weights({"code": 1, "en": float("inf")}, "cfg.yaml")
    with pytest.raises(DataError, match=r"cfg.yaml: data.domain_weights: weights sum to 0"):
        corpus.mixing_weights({"code": 0}, "cfg.yaml")


def test_schedule_and_batches_refuse_impossible_requests():
    with pytest.raises(DataError, match="a domain with weight > 0 has no samples"):
        SampleSchedule([4, 0], np.array([0.5, 0.5]), 0)
    with pytest.raises(DataError, match=r"shard_id 2: must be in \[0, num_shards=2\)"):
        next(batches(_source((4, 4)), batch_size=2, num_shards=2, shard_id=2))


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
    (lambda p: None, {"seq_length": 1}, "--seq-length 1: must be in [2, 1,048,576]"),
    (lambda p: None, {"seq_length": 10 ** 11}, "must be in [2, 1,048,576]"),
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
