"""`pangu-sigma train`, and its options for the launcher, which checks them before any rank starts."""

from __future__ import annotations

import argparse
import dataclasses

from mindformers_sigma.arg_types import positive_int
from mindformers_sigma.config import SigmaConfig, apply_overrides, load_config
from mindformers_sigma.errors import UserError
from mindformers_sigma.one_line_parser import Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`pangu-sigma train`'s options (also checked by the launcher before it starts any rank)."""
    parser.add_argument("--config", help="YAML config file (default with --resume PATH: the checkpoint's own)")
    parser.add_argument("--steps", type=positive_int, help="number of steps (default: train.steps)")
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


def train_config(args: argparse.Namespace) -> SigmaConfig:
    """The config a `train` command line describes: the file (or the one a --resume checkpoint records, laid
    out for one process: a launcher sets its own layout), then --data, then the --set overrides."""
    if args.config is not None:
        config = load_config(args.config)
    elif args.resume not in (None, "auto"):
        from mindformers_sigma.checkpoint.description import describe_checkpoint

        config = describe_checkpoint(args.resume, flag="--resume").config
        config = dataclasses.replace(config, parallel=dataclasses.replace(
            config.parallel, mode="stand_alone", device_num=1, data_parallel=1, model_parallel=1, expert_parallel=1,
            pipeline_stage=1, micro_batch_num=1))
    else:
        raise UserError("--config: required, unless --resume names a checkpoint, whose recorded config is used")
    if args.data is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, source="mindrecord", path=args.data))
    return apply_overrides(config, args.set)


def run(args: argparse.Namespace) -> int:
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
             + (f" (all ranks: {summary.ecss['all_ranks_h2d_bytes'] / 2 ** 20:,.1f} MiB to and "
                f"{summary.ecss['all_ranks_d2h_bytes'] / 2 ** 20:,.1f} MiB from their devices)"
                if summary.ecss["all_ranks_h2d_bytes"] != summary.ecss["h2d_bytes"] else "")
             if summary.ecss else "")
          + (f"; checkpoint {summary.checkpoint}" if summary.checkpoint else ""))
    return 0


COMMANDS = (Command("train", "train a model described by a config", add_arguments, run),)
