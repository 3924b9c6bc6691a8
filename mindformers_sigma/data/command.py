"""`pangu-sigma prepare-data` and `pangu-sigma demo-corpus`: text in, packed training samples out."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Tuple

from mindformers_sigma.arg_types import integer_in, number_in, positive_int
from mindformers_sigma.errors import UserError, one_line
from mindformers_sigma.one_line_parser import Command


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", action="append", default=[], metavar="NAME=PATH",
                        help="a domain and its file (any kind), or folder or glob of .txt/.jsonl and --include "
                             "files (repeatable; order gives the ids)")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB[,GLOB...]",
                        help="also take files whose name matches, e.g. '*.py,*.c,*.h' (repeatable)")
    parser.add_argument("--out", required=True,
                        help="output folder (replaced atomically; may hold only prepare-data's own files)")
    parser.add_argument("--seq-length", type=int, required=True, help="model sequence length L (samples hold L+1)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--vocab-size", type=positive_int, help="train a SentencePiece model of this size")
    source.add_argument("--tokenizer", help="use this SentencePiece model instead (this project's, or PanGu-α's "
                                            "vocab.model, told apart by its pieces), or the one a checkpoint "
                                            "(.ckpt/.safetensors/.json) carries")
    parser.add_argument("--holdout", type=number_in("[0, 1)", "a fraction"), default=0.0, metavar="FRACTION",
                        help="set this share of each domain's documents aside, whole, as the held-out split "
                             "(for eval perplexity and make-task; training never reads it)")
    parser.add_argument("--holdout-seed", type=integer_in(0, 2 ** 31 - 1), default=0, help="which documents are held out")


def _checkpoint_tokenizer(checkpoint: str, target: str) -> Tuple[str, str]:
    """``--tokenizer CKPT``: the tokenizer a checkpoint's description carries, written to ``target``, and its kind."""
    from mindformers_sigma.checkpoint.description import describe_checkpoint

    described = describe_checkpoint(checkpoint, flag="--tokenizer")
    if described.tokenizer is None:
        raise UserError(f"--tokenizer {checkpoint}: its model was trained on synthetic token ids and has no "
                        f"tokenizer; give a .model file")
    with open(target, "wb") as handle:
        handle.write(described.tokenizer.model_bytes)
    return target, described.tokenizer.kind


def run_prepare(args: argparse.Namespace) -> int:
    from mindformers_sigma.data.prepare import parse_domain_args, parse_include_args, prepare_data

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer, kind = args.tokenizer, None
        if tokenizer is not None and tokenizer.endswith((".json", ".ckpt", ".safetensors")):
            tokenizer, kind = _checkpoint_tokenizer(tokenizer, os.path.join(scratch, "tokenizer.model"))
        manifest = prepare_data(parse_domain_args(args.domain), args.out, args.seq_length,
                                vocab_size=args.vocab_size, tokenizer_path=tokenizer, tokenizer_kind=kind,
                                include=parse_include_args(args.include), holdout=args.holdout,
                                holdout_seed=args.holdout_seed)
    for domain in manifest["domains"]:
        skipped = ", ".join(f"{k} {v}" for k, v in domain["skipped"].items() if v) or "none"
        heldout = domain.get("heldout")
        print(f"{domain['name']:>12}: id {domain['id']}, {domain['documents']} documents, {domain['tokens']:,} tokens, "
              f"{domain['samples']} samples (skipped: {skipped})"
              + (f"; held out {heldout['documents']} documents, {heldout['tokens']:,} tokens, {heldout['samples']} "
                 f"samples" if heldout else ""))
        if heldout is not None and not heldout["documents"]:
            print(one_line(f"warning: domain {domain['name']!r} has {domain['documents']} document(s), so none is "
                           f"held out (training keeps at least one): eval has no held-out text for it"), file=sys.stderr)
    print(f"wrote {args.out}/manifest.json (tokenizer vocabulary {manifest['tokenizer']['vocab_size']})")
    return 0


def add_demo_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")
    parser.add_argument("--cache", help="download cache (default: $PANGU_SIGMA_CACHE or ~/.cache/mindformers_sigma)")


def run_demo_corpus(args: argparse.Namespace) -> int:
    from mindformers_sigma.data.demo_corpus import build_demo_corpus

    try:
        build_demo_corpus(args.out, args.cache)
    except OSError as err:
        print(f"pangu-sigma demo-corpus: error: {err}", file=sys.stderr)
        return 1
    return 0


COMMANDS = (
    Command("prepare-data", "tokenize per-domain text into packed MindRecord shards", add_prepare_arguments,
            run_prepare),
    Command("demo-corpus", "build the real multi-domain demo corpus (.jsonl per domain)", add_demo_corpus_arguments,
            run_demo_corpus),
)
