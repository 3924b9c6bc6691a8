"""`pangu-sigma eval perplexity | zeroshot` and `pangu-sigma make-task`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from mindformers_sigma.arg_types import integer_in
from mindformers_sigma.errors import DataError, UserError, one_line
from mindformers_sigma.one_line_parser import Command, add_commands


def add_perplexity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a checkpoint (full model or extracted sub-model)")
    parser.add_argument("--data", required=True, help="a prepare-data folder (prepared with the checkpoint's tokenizer)")
    parser.add_argument("--split", choices=["heldout", "train"], default="heldout",
                        help="heldout (prepare-data --holdout) or the training samples")
    parser.add_argument("--batch-size", type=integer_in(1, 4096), default=8)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_zeroshot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a checkpoint")
    parser.add_argument("--task", required=True, help="a .jsonl task: {context, choices, label} or {context, answer}")
    parser.add_argument("--domain", help="the domain whose experts answer (optional for a dense or one-domain model)")
    parser.add_argument("--norm", choices=["none", "tokens", "chars"], default="tokens",
                        help="divide a choice's loss by nothing, its tokens or its characters")
    parser.add_argument("--batch-size", type=integer_in(1, 4096), default=16)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_make_task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="a prepare-data folder with a held-out split")
    parser.add_argument("--domain", required=True, help="the domain whose held-out documents make the task")
    parser.add_argument("--out", required=True, help="the .jsonl file to write")
    parser.add_argument("--choices", type=integer_in(1, 1_000_000), default=4)
    parser.add_argument("--n", type=integer_in(1, 1_000_000), default=500, help="records (at most one per held-out passage)")
    parser.add_argument("--context-tokens", type=integer_in(1, 1_000_000), default=48)
    parser.add_argument("--continuation-tokens", type=integer_in(1, 1_000_000), default=16)
    parser.add_argument("--seed", type=integer_in(1, 1_000_000), default=1)


def _scorer(described):
    from mindformers_sigma.checkpoint.model import inference_config, load_model
    from mindformers_sigma.context import configure_context
    from mindformers_sigma.eval.scoring import TokenLogProbs

    configure_context(inference_config(described.config))
    return TokenLogProbs(load_model(described))


def run_perplexity(args: argparse.Namespace) -> int:
    from mindformers_sigma.checkpoint.description import describe_checkpoint
    from mindformers_sigma.data.dataset import PreparedCorpus
    from mindformers_sigma.eval.perplexity import Progress, domain_perplexity, overall, perplexity_report

    described = describe_checkpoint(args.ckpt)
    corpus = PreparedCorpus(args.data, split=args.split)
    corpus.require_tokenizer(described.tokenizer_model, "--data")
    config = described.config
    if corpus.sample_length != config.model.seq_length + 1:
        raise DataError(f"--data {args.data}: samples of {corpus.sample_length} tokens, the model reads "
                        f"{config.model.seq_length + 1}; prepare it with --seq-length {config.model.seq_length}")
    if corpus.vocab_size > config.model.vocab_size:
        raise DataError(f"--data {args.data}: its tokenizer has {corpus.vocab_size} tokens, the model "
                        f"{config.model.vocab_size}; prepare it with prepare-data --tokenizer {args.ckpt}")
    # a dense or one-domain model computes the same for every domain id, so it scores every domain of the corpus
    known = corpus.names if described.one_domain else described.domains
    evaluated = [(name, described.domains.index(name) if name in described.domains else 0, samples)
                 for name, samples in zip(corpus.names, corpus.samples) if name in known and samples.shape[0]]
    skipped = [name for name in corpus.names if name not in known]
    if not evaluated:
        raise DataError(f"--data {args.data}: none of its domains ({', '.join(corpus.names)}) with {args.split} "
                        f"samples is a domain of the checkpoint ({', '.join(described.domains)})")
    if skipped:
        print(one_line(f"eval: skipping domains the checkpoint does not have: {', '.join(skipped)}"), file=sys.stderr)
    scorer = _scorer(described)
    progress = Progress(sum(samples.shape[0] for _, _, samples in evaluated))
    results = {name: domain_perplexity(scorer, name, domain_id, samples, config.model.seq_length,
                                       config.model.eod_token_id, args.batch_size, progress)
               for name, domain_id, samples in evaluated}
    results["overall"] = overall(list(results.values()))
    if args.json:
        print(json.dumps({"split": args.split, "domains": {n: r.as_dict() for n, r in results.items()}}, indent=1))
    else:
        print(perplexity_report(results))
    return 0


def run_zeroshot(args: argparse.Namespace) -> int:
    from mindformers_sigma.checkpoint.description import describe_checkpoint
    from mindformers_sigma.eval.zeroshot import evaluate, read_task

    described = describe_checkpoint(args.ckpt)
    domain_id = described.chosen_domain(args.domain)
    if described.tokenizer is None:
        raise DataError(f"--ckpt {args.ckpt}: trained on synthetic token ids, so it has no tokenizer for text tasks")
    records = read_task(args.task)
    result = evaluate(_scorer(described), described.tokenizer, records, domain_id, described.config.model.seq_length,
                      args.norm, args.batch_size)
    if args.json:
        print(json.dumps(dict(result.as_dict(), task=args.task, domain=described.domains[domain_id], norm=args.norm),
                         indent=1))
    else:
        low, high = result.interval()
        chance = f"; chance {result.chance:.3f}" if result.chance is not None else ""
        print(f"{args.task}: accuracy {result.accuracy:.3f} (95% CI {low:.3f}-{high:.3f}) on {result.records} "
              f"records, domain {described.domains[domain_id]}, norm {args.norm}{chance}")
    return 0


def run_make_task(args: argparse.Namespace) -> int:
    from mindformers_sigma.atomic import write_bytes_atomic
    from mindformers_sigma.data.dataset import PreparedCorpus
    from mindformers_sigma.eval.make_task import make_records
    from mindformers_sigma.data.manifest import read_corpus_tokenizer

    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UserError(f"--out {args.out}: its folder does not exist; create it first")
    if os.path.lexists(args.out):
        raise UserError(f"--out {args.out}: exists; choose a new name (nothing is overwritten)")
    if args.choices < 2:
        raise UserError("--choices: a multiple-choice task needs at least 2")
    corpus = PreparedCorpus(args.data, split="heldout")
    if args.context_tokens + args.continuation_tokens > corpus.sample_length:
        raise UserError(f"--context-tokens {args.context_tokens} + --continuation-tokens {args.continuation_tokens}: "
                        f"more than the {corpus.sample_length} tokens a model of {args.data} reads at once, so "
                        f"contexts would be cut; lower them")
    if args.domain not in corpus.names:
        raise DataError(f"--domain {args.domain!r}: not a domain of {args.data}; known: {', '.join(corpus.names)}")
    tokenizer = read_corpus_tokenizer(args.data, corpus.manifest)
    records = make_records(corpus.samples[corpus.names.index(args.domain)], tokenizer, args.domain, args.choices,
                           args.n, args.context_tokens, args.continuation_tokens, args.seed)
    write_bytes_atomic(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
    print(one_line(f"wrote {args.out}: {len(records)} records of {args.choices} choices from the held-out documents "
                   f"of {args.domain}" + (f" (asked for {args.n}; the split has no more)" if len(records) < args.n
                                          else "")))
    return 0


KINDS = (
    Command("perplexity", "token-level perplexity per domain and overall (EOD inputs excluded)",
            add_perplexity_arguments, run_perplexity),
    Command("zeroshot", "zero-shot multiple choice / cloze accuracy with a 95% interval", add_zeroshot_arguments,
            run_zeroshot),
)

COMMANDS = (
    Command("eval", "evaluate a checkpoint: perplexity per domain, zero-shot tasks",
            lambda parser: add_commands(parser, KINDS, "kind"), lambda args: args.run_kind(args)),
    Command("make-task", "a multiple-choice task from held-out documents", add_make_task_arguments, run_make_task),
)
