"""The `pangu-sigma` command (also `python -m mindformers_sigma`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

# MindSpore's C++ warnings (graph-compiler notes) drown the progress lines; GLOG_v=2 shows them.
os.environ.setdefault("GLOG_v", "3")

from mindformers_sigma.arg_types import integer_in, number_in  # noqa: E402
from mindformers_sigma.config import SigmaConfig, apply_overrides, load_config  # noqa: E402
from mindformers_sigma.errors import UserError, one_line, run_reporting_errors  # noqa: E402
from mindformers_sigma.one_line_parser import OneLineParser  # noqa: E402


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _cmd_params(args: argparse.Namespace) -> int:
    from mindformers_sigma.params import count_parameters, format_count

    config = load_config(args.config)
    count = count_parameters(config)
    slab = None
    if config.moe.table_routed and config.model.sparse_layers:
        from mindformers_sigma.ecss.slab import smallest_safe_slab, whole_step_slab

        slab = {"smallest_safe": smallest_safe_slab(config), "whole_step": whole_step_slab(config)}
    if args.json:
        print(json.dumps(dict(count.as_dict(), ecss_slab_experts=slab), indent=2))
        return 0
    print(f"total parameters       {count.total:>20,}  ({format_count(count.total)})")
    print(f"activated per token    {count.activated_per_token:>20,}  ({format_count(count.activated_per_token)})")
    submodel = f"{count.domain_submodel:>20,}" if count.domain_submodel is not None else f"{'n/a (learned router)':>20}"
    print(f"one domain's sub-model {submodel}  ({format_count(count.domain_submodel)})")
    print(f"routing table entries  {count.routing_table_entries:>20,}  (int32, not trainable)")
    if slab is not None:
        print(f"ECSS slab, experts     {slab['smallest_safe']:>20,}  (smallest safe; {slab['whole_step']:,} hold a whole "
              f"step without reloads)")
    return 0


_MEMORY_GIB = number_in("(0, 1e6]", "GiB, a number")


def _strategy_folder(path: str) -> str:
    """--emit-strategy's folder: an existing one, or a new one in an existing parent (nothing is created
    for a path that will fail, and nothing but the file is written)."""
    if not path:
        raise UserError("--emit-strategy: give a folder for the strategy file, e.g. --emit-strategy strategies")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--emit-strategy {path}: not a folder; give a folder to write <config name>.json into")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"--emit-strategy {path}: its parent folder {parent} does not exist; create it first")
    return path


def _cmd_plan(args: argparse.Namespace) -> int:
    from mindformers_sigma.parallel.planner import check_fits, plan_layout
    from mindformers_sigma.parallel.report import format_plan
    from mindformers_sigma.parallel.strategy_file import write_strategy_file

    folder = _strategy_folder(args.emit_strategy) if args.emit_strategy is not None else None
    config = apply_overrides(load_config(args.config), args.set)
    plan = plan_layout(config, args.hbm_gb, args.host_gb)
    print(json.dumps(plan.as_dict(), indent=1) if args.json else format_plan(plan), flush=True)
    check_fits(plan)  # a layout that does not fit gets no strategy file
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, os.path.splitext(os.path.basename(args.config))[0] + ".json")
        write_strategy_file(config, args.config, target, args.set)
        print(one_line(f"wrote {target}"), file=sys.stderr)
    return 0


def train_config(args: argparse.Namespace) -> SigmaConfig:
    """The config a `train` command line describes: the file (or the one a --resume checkpoint records),
    then --data, then the --set overrides."""
    if args.config is not None:
        config = load_config(args.config)
    elif args.resume not in (None, "auto"):
        from mindformers_sigma.training.description import describe_checkpoint

        config = describe_checkpoint(args.resume).config
    else:
        raise UserError("--config: required, unless --resume names a checkpoint, whose recorded config is used")
    if args.data is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, source="mindrecord", path=args.data))
    return apply_overrides(config, args.set)


def _cmd_train(args: argparse.Namespace) -> int:
    config = train_config(args)
    from mindformers_sigma.training.trainer import train

    summary = train(config, steps=args.steps, out_dir=args.out, resume=args.resume, overwrite=args.overwrite,
                    allow_config_change=args.allow_config_change)
    print(f"done: steps {summary.resumed_from or 0} -> {summary.steps}, loss {summary.first_loss:.4f} -> "
          f"{summary.final_loss:.4f}, {summary.tokens_per_second:,.0f} tokens/s, MFU {summary.mfu:.3f} "
          f"(peak {summary.peak_flops / 1e9:.1f} GFLOP/s), {summary.compiled_graphs} graph(s) compiled in "
          f"{summary.compile_seconds:.1f}s (excluded from tokens/s), "
          f"{summary.skipped_steps} overflow-skipped steps, {summary.dropped_assignments} dropped expert assignments, "
          f"peak RSS {summary.peak_rss_mb:,.0f} MB"
          + (f"; ECSS moved {summary.ecss['h2d_bytes'] / 2 ** 20:,.1f} MiB to and "
             f"{summary.ecss['d2h_bytes'] / 2 ** 20:,.1f} MiB from the device, transfers "
             f"{summary.ecss['transfer_seconds']:.1f}s, host updates {summary.ecss['host_update_seconds']:.1f}s"
             if summary.ecss else "")
          + (f"; checkpoint {summary.checkpoint}" if summary.checkpoint else ""))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from mindformers_sigma.benchmarks.suite import run_suite

    if args.name is not None and args.only is not None:
        raise UserError("bench: give a part name or --only, not both")
    run_suite(args.quick, args.only if args.name is None else {"generate": "generation"}.get(args.name, args.name),
              args.out, args.docs)
    return 0


def _cmd_prepare_data(args: argparse.Namespace) -> int:
    import tempfile

    from mindformers_sigma.data.prepare import parse_domain_args, parse_include_args, prepare_data

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = args.tokenizer
        if tokenizer is not None and tokenizer.endswith((".json", ".ckpt", ".safetensors")):
            tokenizer = _checkpoint_tokenizer(tokenizer, os.path.join(scratch, "tokenizer.model"))
        manifest = prepare_data(parse_domain_args(args.domain), args.out, args.seq_length,
                                vocab_size=args.vocab_size, tokenizer_path=tokenizer,
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


def _checkpoint_tokenizer(checkpoint: str, target: str) -> str:
    """``--tokenizer CKPT``: the tokenizer a checkpoint's description carries, written to ``target``."""
    from mindformers_sigma.training.description import describe_checkpoint

    described = describe_checkpoint(checkpoint, flag="--tokenizer")
    if described.tokenizer is None:
        raise UserError(f"--tokenizer {checkpoint}: its model was trained on synthetic token ids and has no "
                        f"tokenizer; give a .model file")
    with open(target, "wb") as handle:
        handle.write(described.tokenizer.model_bytes)
    return target


def _cmd_demo_corpus(args: argparse.Namespace) -> int:
    from mindformers_sigma.data.demo_corpus import build_demo_corpus

    try:
        build_demo_corpus(args.out, args.cache)
    except OSError as err:
        print(f"pangu-sigma demo-corpus: error: {err}", file=sys.stderr)
        return 1
    return 0


def _cmd_rank_table(args: argparse.Namespace) -> int:
    from mindformers_sigma.rank_table.cli import TOOLS, run_tool

    return run_tool(args, TOOLS[args.tool][1], f"pangu-sigma rank-table {args.tool}")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """`pangu-sigma train`'s options (also checked by the launcher before it starts any rank)."""
    parser.add_argument("--config", help="YAML config file (default with --resume PATH: the checkpoint's own)")
    parser.add_argument("--steps", type=_positive_int, help="number of steps (default: train.steps)")
    parser.add_argument("--data", help="prepare-data folder (overrides the config's data section)")
    parser.add_argument("--out", help="run folder: metrics.jsonl, loss.png, checkpoints/")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="auto: newest valid checkpoint in OUT/checkpoints (none: start at step 0); "
                             "or a checkpoint file")
    parser.add_argument("--overwrite", action="store_true",
                        help="a used --out: remove the previous run's outputs and start over (with --resume auto: "
                             "only when no checkpoint is usable; with --resume PATH: the later checkpoints)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume although the model, routing or data-order keys or the data differ")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (YAML syntax), validated like the file; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pangu-sigma", description="PanGu-Σ in MindSpore: train, inspect and plan.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    params = commands.add_parser("params", help="count parameters from a config without building the model")
    params.add_argument("--config", required=True, help="YAML config file")
    params.add_argument("--json", action="store_true", help="print JSON with total, activated_per_token, domain_submodel")
    params.set_defaults(handler=_cmd_params)

    plan = commands.add_parser("plan", help="the device layout of a config: per-parameter layouts, memory per device, "
                                            "communication per step, a roofline tokens/s; strategy files")
    plan.add_argument("--config", required=True, help="YAML config file")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    plan.add_argument("--emit-strategy", metavar="DIR", help="also write DIR/<config name>.json, a MindSpore strategy file")
    plan.add_argument("--hbm-gb", type=_MEMORY_GIB, default=32.0, help="device memory in GiB (Ascend 910: 32)")
    plan.add_argument("--host-gb", type=_MEMORY_GIB, default=512.0, help="host memory per server in GiB")
    plan.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override one config value (YAML syntax), validated like the file; repeatable")
    plan.set_defaults(handler=_cmd_plan)

    train = commands.add_parser("train", help="train a model described by a config")
    add_train_arguments(train)
    train.set_defaults(handler=_cmd_train)

    prepare = commands.add_parser("prepare-data", help="tokenize per-domain text into packed MindRecord shards")
    prepare.add_argument("--domain", action="append", default=[], metavar="NAME=PATH",
                         help="a domain and its file (any kind), or folder or glob of .txt/.jsonl and --include "
                              "files (repeatable; order gives the ids)")
    prepare.add_argument("--include", action="append", default=[], metavar="GLOB[,GLOB...]",
                         help="also take files whose name matches, e.g. '*.py,*.c,*.h' (repeatable)")
    prepare.add_argument("--out", required=True,
                         help="output folder (replaced atomically; may hold only prepare-data's own files)")
    prepare.add_argument("--seq-length", type=int, required=True, help="model sequence length L (samples hold L+1)")
    source = prepare.add_mutually_exclusive_group(required=True)
    source.add_argument("--vocab-size", type=_positive_int, help="train a SentencePiece model of this size")
    source.add_argument("--tokenizer", help="use this SentencePiece model instead, or the one a checkpoint "
                                            "(.ckpt/.safetensors/.json) carries")
    prepare.add_argument("--holdout", type=number_in("[0, 1)", "a fraction"), default=0.0, metavar="FRACTION",
                         help="set this share of each domain's documents aside, whole, as the held-out split "
                              "(for eval perplexity and make-task; training never reads it)")
    prepare.add_argument("--holdout-seed", type=integer_in(0, 2 ** 31 - 1), default=0, help="which documents are held out")
    prepare.set_defaults(handler=_cmd_prepare_data)

    rank_table = commands.add_parser("rank-table", help="HCCL rank tables: generate, merge, validate, plan")
    tools = rank_table.add_subparsers(dest="tool", required=True, parser_class=OneLineParser)
    from mindformers_sigma.rank_table.cli import TOOLS

    for name, (add_arguments, _, description) in TOOLS.items():
        add_arguments(tools.add_parser(name, help=description, description=description))
    rank_table.set_defaults(handler=_cmd_rank_table)

    from mindformers_sigma.generation import command as generate_command
    from mindformers_sigma.lifecycle import commands as lifecycle

    generate = commands.add_parser("generate", help="continue prompts with a checkpoint's model (KV-cached decoding)")
    generate_command.add_arguments(generate)
    generate.set_defaults(handler=generate_command.run)
    for name, add_arguments, handler, description in (
        ("inherit", lifecycle.add_inherit_arguments, lifecycle.run_inherit,
         "a PanGu-Σ checkpoint whose experts start as copies of a dense model's FFNs"),
        ("extract", lifecycle.add_extract_arguments, lifecycle.run_extract,
         "cut one domain's stand-alone sub-model out of a checkpoint"),
        ("add-domain", lifecycle.add_add_domain_arguments, lifecycle.run_add_domain,
         "add a domain (expert group and routing rows) to a checkpoint"),
    ):
        sub = commands.add_parser(name, help=description, description=description)
        add_arguments(sub)
        sub.set_defaults(handler=handler)

    from mindformers_sigma.eval import command as eval_command

    evaluation = commands.add_parser("eval", help="evaluate a checkpoint: perplexity per domain, zero-shot tasks")
    kinds = evaluation.add_subparsers(dest="kind", required=True, parser_class=OneLineParser)
    perplexity = kinds.add_parser("perplexity", help="token-level perplexity per domain and overall (EOD inputs "
                                                     "excluded)")
    eval_command.add_perplexity_arguments(perplexity)
    perplexity.set_defaults(handler=eval_command.run_perplexity)
    zeroshot = kinds.add_parser("zeroshot", help="zero-shot multiple choice / cloze accuracy with a 95% interval")
    eval_command.add_zeroshot_arguments(zeroshot)
    zeroshot.set_defaults(handler=eval_command.run_zeroshot)
    make_task = commands.add_parser("make-task", help="a multiple-choice task from held-out documents")
    eval_command.add_make_task_arguments(make_task)
    make_task.set_defaults(handler=eval_command.run_make_task)

    demo = commands.add_parser("demo-corpus", help="build the real multi-domain demo corpus (.jsonl per domain)")
    demo.add_argument("--out", required=True, help="output folder (replaced atomically)")
    demo.add_argument("--cache", help="download cache (default: $PANGU_SIGMA_CACHE or ~/.cache/mindformers_sigma)")
    demo.set_defaults(handler=_cmd_demo_corpus)

    bench = commands.add_parser("bench", help="run the project's benchmarks on this machine: OUT/bench.json, "
                                              "bench.md, bench.png and each part's OUT/PART.json")
    bench.add_argument("name", nargs="?", choices=["training", "routers", "ecss", "data", "generation", "generate",
                                                   "kernels"],
                       help="one part only (default: all; see --only)")
    bench.add_argument("--only", metavar="PART[,PART...]", help="these parts: training, routers, ecss, data, "
                                                               "generation, kernels")
    bench.add_argument("--quick", action="store_true", help="small models and few steps (checks it runs, not speed)")
    bench.add_argument("--out", default="bench/results", help="output folder (default bench/results)")
    bench.add_argument("--docs", metavar="FILE", help="also write the tables to FILE (docs/PERFORMANCE.md)")
    bench.set_defaults(handler=_cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; every failure is one line on stderr (2: bad input, 1: internal error)."""
    args = build_parser().parse_args(argv)
    return run_reporting_errors(f"pangu-sigma {args.command}", lambda: args.handler(args))
