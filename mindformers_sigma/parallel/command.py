"""`pangu-sigma params` and `pangu-sigma plan`: what a config's model holds, and how it lays out on devices."""

from __future__ import annotations

import argparse
import json
import os
import sys

from mindformers_sigma.arg_types import number_in
from mindformers_sigma.config import apply_overrides, load_config
from mindformers_sigma.errors import UserError, one_line
from mindformers_sigma.one_line_parser import Command

_MEMORY_GIB = number_in("(0, 1e6]", "GiB, a number")


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--json", action="store_true", help="print JSON with total, activated_per_token, domain_submodel")


def run_params(args: argparse.Namespace) -> int:
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
        print(f"ECSS slab, per rank    {slab['smallest_safe']:>20,}  (smallest safe; {slab['whole_step']:,} hold a whole "
              f"step without reloads)")
    return 0


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("--emit-strategy", metavar="DIR", help="also write DIR/<config name>.json, a MindSpore strategy file")
    parser.add_argument("--hbm-gb", type=_MEMORY_GIB, default=32.0, help="device memory in GiB (Ascend 910: 32)")
    parser.add_argument("--host-gb", type=_MEMORY_GIB, default=512.0, help="host memory per server in GiB")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (YAML syntax), validated like the file; repeatable")


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


def run_plan(args: argparse.Namespace) -> int:
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


COMMANDS = (
    Command("params", "count parameters from a config without building the model", add_params_arguments,
            run_params),
    Command("plan", "the device layout of a config: per-parameter layouts, memory per device, communication per "
                    "step, a roofline tokens/s; strategy files", add_plan_arguments, run_plan),
)
