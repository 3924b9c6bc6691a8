"""prepare-data's inputs: source trees, vocabulary sizes, output folders, leftovers of killed runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mindformers_sigma.atomic import _host  # the host part of temporary names, to fake a killed run's
from mindformers_sigma.cli import main
from mindformers_sigma.data.dataset import PreparedCorpus
from mindformers_sigma.data.prepare import parse_domain_args, parse_include_args, prepare_data, unpack_documents
from mindformers_sigma.errors import DataError
from mindformers_sigma.tokenizer.sentencepiece_bpe import Tokenizer

from conftest import REPO

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CHINESE = ["迈向充满希望的新世纪——一九九八年新年讲话", "同胞们、朋友们、女士们、先生们：\n  在这辞旧迎新的美好时刻。",
           "中国人民将在新的一年里 继续努力 🎉"]


def _text_file(folder: Path) -> Path:
    path = folder / "prose.txt"
    path.write_text("The quick brown fox jumps over the lazy dog; then it naps.\n" * 20)
    return path


def _source_tree(root: Path) -> Path:
    """A small package: real stdlib modules, a C file, a README, plus what must be left out or skipped."""
    tree = root / "project"
    (tree / "json").mkdir(parents=True)
    for module in ("textwrap.py", "bisect.py", "json/__init__.py", "json/scanner.py"):
        shutil.copyfile(STDLIB / module, tree / module)
    (tree / "speedups.c").write_text("#include <stddef.h>\n\nsize_t count(const char *s) {\n\treturn s ? 1 : 0;\n}\n")
    (tree / "README.txt").write_text("A package for the source-tree test.\n")
    (tree / "Makefile").write_text("all:\n\tcc -c speedups.c\n")  # matches no pattern
    (tree / "compiled.py").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))  # a binary
    (tree / "legacy.py").write_bytes("# -*- coding: latin-1 -*-\nNAME = 'café'\n".encode("latin-1"))
    for hidden in (".git/hooks/post-update.py", ".venv/lib/site.py"):
        (tree / hidden).parent.mkdir(parents=True)
        (tree / hidden).write_text("print('must not be read')\n")
    return tree


def test_source_tree_domains_take_include_patterns_and_skip_hidden_binary_and_latin1(tmp_path):
    tree = _source_tree(tmp_path)
    out = tmp_path / "out"
    assert main(["prepare-data", "--domain", f"tree={tree}", "--domain", f"globbed={tree}/json/*.py",
                 "--domain", f"single={tree / 'speedups.c'}", "--include", "*.py", "--include", "*.c,*.h",
                 "--out", str(out), "--seq-length", "31", "--vocab-size", "500"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    tree_domain, globbed, single = manifest["domains"]
    used = sorted(str(tree / name) for name in ("textwrap.py", "bisect.py", "json/__init__.py", "json/scanner.py",
                                                 "speedups.c", "README.txt", "compiled.py", "legacy.py"))
    assert [source["path"] for source in tree_domain["sources"]] == used
    assert tree_domain["skipped"] == {"empty": 0, "binary": 1, "invalid_utf8": 1, "bad_json": 0}
    assert [source["path"] for source in globbed["sources"]] == [str(tree / "json/__init__.py"),
                                                                  str(tree / "json/scanner.py")]
    assert [source["path"] for source in single["sources"]] == [str(tree / "speedups.c")]
    corpus = PreparedCorpus(str(out))
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.model"))
    decoded = [tokenizer.decode(doc) for doc in unpack_documents(corpus.samples[0])]
    assert decoded == [Path(p).read_text() for p in used if not p.endswith(("compiled.py", "legacy.py"))]
    assert [tokenizer.decode(doc) for doc in unpack_documents(corpus.samples[2])] == [(tree / "speedups.c").read_text()]


@pytest.mark.parametrize("value,message", [
    ("*.py,", "empty pattern"),
    ("src/*.py", "patterns match file names only"),
])
def test_bad_include_pattern_is_one_line(value, message):
    with pytest.raises(DataError, match=re.escape(message)):
        parse_include_args([value])


def test_folder_without_matching_files_suggests_include(tmp_path):
    tree = _source_tree(tmp_path)
    (tree / "README.txt").unlink()
    with pytest.raises(DataError, match=r"no files named \*\.txt or \*\.jsonl there; add file-name patterns "
                                        r"with --include"):
        prepare_data([("code", str(tree / "json"))], str(tmp_path / "out"), 8, vocab_size=300)


@pytest.mark.parametrize("value,message", [
    ("a b=x.txt", "domain name 'a b' must be 1-64 letters, digits"),
    ("x" * 65 + "=x.txt", "must be 1-64 letters, digits"),
    ("=x.txt", "expected NAME=PATH"),
    ("code=", "expected NAME=PATH"),
])
def test_bad_domain_names_are_refused(value, message):
    with pytest.raises(DataError, match=re.escape(message)):
        parse_domain_args([value])


def test_domain_given_twice_is_refused():
    with pytest.raises(DataError, match="domain 'code' given twice"):
        parse_domain_args(["code=a.txt", "en=b.txt", "code=c.txt"])


@pytest.mark.parametrize("vocab_size", [10 ** 12, 2 ** 31, (1 << 20) + 1])
def test_absurd_vocab_size_is_refused_before_reading(tmp_path, monkeypatch, vocab_size):
    monkeypatch.setattr("mindformers_sigma.data.prepare.read_domain",
                        lambda *a: pytest.fail("text read before --vocab-size was checked"))
    with pytest.raises(DataError, match=rf"--vocab-size {vocab_size}: must be <= 1048576 \(2\*\*20\): "
                                        r"SentencePiece stores it as an int32"):
        prepare_data([("d", str(_text_file(tmp_path)))], str(tmp_path / "out"), 8, vocab_size=vocab_size)


@pytest.mark.parametrize("vocab_size,advice", [
    (300, r"too small for the text, whose characters and special pieces need \d+; "
          r"give a larger --vocab-size \(at least (\d+)\)"),
    (5000, r"too large for the text, which yields at most \d+ pieces; give a smaller --vocab-size \(at most (\d+)\)"),
])
def test_sentencepiece_refusal_advises_the_right_direction(tmp_path, vocab_size, advice):
    chinese = tmp_path / "zh.jsonl"
    chinese.write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in CHINESE))
    with pytest.raises(DataError) as info:
        prepare_data([("zh", str(chinese))], str(tmp_path / "out"), 8, vocab_size=vocab_size)
    advised = re.search(advice, str(info.value))
    assert advised and "\n" not in str(info.value), str(info.value)
    manifest = prepare_data([("zh", str(chinese))], str(tmp_path / "out"), 8, vocab_size=int(advised.group(1)))
    assert manifest["tokenizer"]["vocab_size"] == int(advised.group(1))  # the advice works


@pytest.mark.parametrize("out", ["file.txt/sub/out", "file.txt"])
def test_out_that_cannot_be_written_is_one_line_from_the_cli(tmp_path, out):
    (tmp_path / "file.txt").write_text("in the way\n")
    result = subprocess.run([sys.executable, "-m", "mindformers_sigma", "prepare-data", "--domain",
                             f"d={_text_file(tmp_path)}", "--out", str(tmp_path / out), "--seq-length", "8",
                             "--vocab-size", "300"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"pangu-sigma prepare-data: error: --out {tmp_path / out}: cannot write there (")
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_out_is_checked_before_the_tokenizer_is_trained(tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("in the way\n")
    monkeypatch.setattr("mindformers_sigma.data.prepare.train_tokenizer",
                        lambda *a: pytest.fail("tokenizer trained before --out was checked"))
    with pytest.raises(DataError, match=r"file.txt is a file, not a folder\)"):
        prepare_data([("d", str(_text_file(tmp_path)))], str(tmp_path / "file.txt" / "out"), 8, vocab_size=300)


def test_out_with_a_foreign_file_is_refused_and_own_output_is_replaced(tmp_path):
    text = str(_text_file(tmp_path))
    out = tmp_path / "out"
    prepare_data([("d", text)], str(out), 8, vocab_size=300)
    (out / "notes.md").write_text("my notes, not prepare-data's\n")
    with pytest.raises(DataError, match=r"holds notes.md, which prepare-data did not write"):
        prepare_data([("d", text)], str(out), 16, vocab_size=300)
    assert (out / "notes.md").read_text() == "my notes, not prepare-data's\n"
    assert json.loads((out / "manifest.json").read_text())["seq_length"] == 8
    (out / "notes.md").unlink()
    prepare_data([("d", text)], str(out), 16, vocab_size=300)  # only its own files: replaced
    assert json.loads((out / "manifest.json").read_text())["seq_length"] == 16


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_stale_temporaries_of_a_killed_run_are_removed_and_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    stale = tmp_path / f".out.tmp-{_host()}-{dead}-k1ll3d"
    running = tmp_path / f".out.tmp-{_host()}-{live}-runn1ng"
    other_output = tmp_path / f".other.tmp-{_host()}-{dead}-n0tm1ne"
    for folder in (stale, running, other_output):
        folder.mkdir()
        (folder / "000-d-00000.mindrecord").write_bytes(b"half written")
    prepare_data([("d", str(_text_file(tmp_path)))], str(tmp_path / "out"), 8, vocab_size=300)
    assert not stale.exists()
    assert running.exists() and other_output.exists()


def test_jsonl_with_byte_order_mark_and_null_provenance(tmp_path):
    jsonl = tmp_path / "notepad.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(
        json.dumps({"text": t, "source": None, "license": "CC0"}) + "\n"
        for t in ("first line, after the BOM", "second line")).encode())
    manifest = prepare_data([("d", str(jsonl)), ("e", str(_text_file(tmp_path)))], str(tmp_path / "out"), 8,
                            vocab_size=300)
    domain = manifest["domains"][0]
    assert domain["documents"] == 2 and domain["skipped"]["bad_json"] == 0
    assert domain["provenance"] == [{"source": "", "license": "CC0", "documents": 2}]


def test_a_file_name_that_is_not_utf8_is_read_and_recorded(tmp_path):
    folder = tmp_path / os.fsdecode(b"corpus_\xff")
    folder.mkdir()
    (folder / os.fsdecode(b"d\xfe.txt")).write_text("print('a file whose name is latin-1')\n" * 30)
    manifest = prepare_data([("code", str(folder))], str(tmp_path / "out"), 8, vocab_size=300)
    recorded = manifest["domains"][0]["sources"][0]["path"]
    assert recorded.endswith("corpus_\\xff/d\\xfe.txt") and manifest["domains"][0]["documents"] == 1
    assert PreparedCorpus(str(tmp_path / "out")).samples[0].shape[0] >= 1


def test_out_that_would_replace_a_link_or_the_current_folder_or_overflow_a_name_is_refused(tmp_path, monkeypatch):
    text = _text_file(tmp_path)
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    long_name = tmp_path / ("n" * 200)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out, words in ((tmp_path / "link", "symbolic link"), (here, "holds the current folder"),
                       (Path("."), "holds the current folder"), (long_name, "longer than")):
        with pytest.raises(DataError, match=words):
            prepare_data([("d", str(text))], str(out), 8, vocab_size=300)
    assert os.path.islink(tmp_path / "link") and here.is_dir() and not long_name.exists()
