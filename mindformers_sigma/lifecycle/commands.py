"""`pangu-sigma inherit | extract | add-domain`: each reads one checkpoint and writes another, atomically."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional

import numpy as np

from mindformers_sigma.arg_types import integer_in, number_in
from mindformers_sigma.atomic import remove_stale_temporaries
from mindformers_sigma.checkpoint.target import checkpoint_target
from mindformers_sigma.errors import DataError, UserError, one_line
from mindformers_sigma.one_line_parser import Command


def add_inherit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dense", required=True, help="a dense PanGu-α checkpoint (model.sparse_layers 0)")
    parser.add_argument("--config", required=True, help="the PanGu-Σ config to build (same backbone shapes)")
    parser.add_argument("--out", required=True, help="the checkpoint to write: NAME.ckpt or NAME.safetensors")
    parser.add_argument("--noise-std", type=number_in("[0, 10]", "a standard deviation"), default=0.0, help="Gaussian noise added to each expert's "
                                                                      "matrices (default 0: exact copies)")
    parser.add_argument("--seed", type=integer_in(0, 2 ** 31 - 1), default=0, help="seed of the noise")
    parser.add_argument("--token-frequency", metavar="DATA_DIR",
                        help="prepare-data folder whose per-domain token counts balance the routing tables")
    parser.add_argument("--dense-config", help="the config an older dense checkpoint was trained with")


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a PanGu-Σ checkpoint")
    parser.add_argument("--domain", required=True, help="the domain to keep (its name)")
    parser.add_argument("--out", required=True, help="a new folder for the sub-model (model.ckpt, model.json, "
                                                     "config.yaml, tokenizer.model)")


def add_add_domain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a PanGu-Σ checkpoint")
    parser.add_argument("--name", required=True, help="the new domain's name")
    parser.add_argument("--init-from", required=True, metavar="DOMAIN|dense",
                        help="copy this domain's experts, or 'dense': the mean of every group")
    parser.add_argument("--out", required=True, help="the checkpoint to write: NAME.ckpt or NAME.safetensors")
    parser.add_argument("--token-frequency", metavar="DATA_DIR",
                        help="prepare-data folder holding the new domain: its token counts balance the new rows")
    parser.add_argument("--seed", type=integer_in(0, 2 ** 31 - 1), help="seed of the new routing rows (default: moe.routing_seed)")


def _frequency(data_dir: Optional[str], domains: List[str], vocab_size: int, tokenizer: Optional[bytes],
               only: Optional[str] = None):
    """Token counts of a prepare-data folder, matched to the model's ``domains`` by name: ``[len(domains), V]``
    (domains the folder lacks get its total), or the row of domain ``only``.  The folder must have been
    prepared with the model's tokenizer, or its token ids would mean other text."""
    if data_dir is None:
        return None
    from mindformers_sigma.data.dataset import PreparedCorpus

    corpus = PreparedCorpus(data_dir)
    corpus.require_tokenizer(tokenizer, "--token-frequency")
    if corpus.vocab_size > vocab_size:
        raise DataError(f"--token-frequency {data_dir}: its tokenizer has {corpus.vocab_size} tokens, the model "
                        f"{vocab_size}; prepare it with the model's tokenizer (prepare-data --tokenizer CKPT)")
    counts = corpus.token_frequency(len(corpus.names), vocab_size)
    if only is not None:
        if only not in corpus.names:
            raise DataError(f"--token-frequency {data_dir}: holds no domain {only!r} (has {', '.join(corpus.names)}); "
                            f"prepare the new domain's text under that name")
        return counts[corpus.names.index(only)]
    matched = [name for name in domains if name in corpus.names]
    if not matched:
        raise DataError(f"--token-frequency {data_dir}: none of its domains ({', '.join(corpus.names)}) is a domain "
                        f"of the model ({', '.join(domains)})")
    table = np.broadcast_to(counts.sum(0), (len(domains), vocab_size)).copy()
    for row, name in enumerate(domains):
        if name in corpus.names:
            table[row] = counts[corpus.names.index(name)]
    return table


def _require_experts(described, path: str) -> None:
    """Domains own experts only in an RRE model with sparse layers."""
    config = described.config
    if not config.moe.table_routed or not config.model.sparse_layers:
        raise DataError(f"--ckpt {path}: a {'dense' if not config.model.sparse_layers else config.moe.router} model "
                        f"has no per-domain experts; give a PanGu-Σ (RRE) checkpoint")


def _new_folder(path: str) -> str:
    """--out for a folder the command creates: a new path in an existing, writable folder."""
    if not path.strip():
        raise UserError("--out: an empty path; give a new folder")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(parent):  # a killed earlier write's temporary folder
        remove_stale_temporaries(parent, re.escape(os.path.basename(os.path.abspath(path))))
    if os.path.exists(path):
        raise UserError(f"--out {path}: exists; give a new folder (nothing is overwritten)")
    if path.endswith((".ckpt", ".safetensors")):
        raise UserError(f"--out {path}: names a folder (it will hold model.ckpt and model.json); drop the extension")
    if not os.path.isdir(parent):
        raise UserError(f"--out {path}: its parent folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {path}: cannot write in {parent}; choose a writable place")
    return path


def _count(config) -> int:
    from mindformers_sigma.params import count_parameters

    return count_parameters(config).total


def run_inherit(args: argparse.Namespace) -> int:
    from mindformers_sigma.checkpoint.description import describe_checkpoint
    from mindformers_sigma.checkpoint.model import inference_config, model_weights, write_model
    from mindformers_sigma.config import load_config
    from mindformers_sigma.lifecycle.inherit import check_same_backbone, inherit_weights
    from mindformers_sigma.parallel.layouts import parameter_layouts

    target = checkpoint_target(args.out)
    sigma = load_config(args.config)
    dense = describe_checkpoint(args.dense, args.dense_config, flag="--dense")
    check_same_backbone(dense.config, sigma, args.dense)
    shapes = {layout.name: layout.shape for layout in parameter_layouts(inference_config(sigma))
              if layout.name.startswith("backbone.")}
    domains = dense.domains[:sigma.moe.num_domains]
    domains += [f"domain{i}" for i in range(len(domains), sigma.moe.num_domains)]
    frequency = _frequency(args.token_frequency, domains, sigma.model.vocab_size, dense.tokenizer_model)
    if frequency is None and sigma.moe.table_balance == "frequency":
        print("inherit: no --token-frequency: the routing tables are drawn uniformly (moe.table_balance frequency "
              "needs the data's token counts)", file=sys.stderr)
    weights = inherit_weights(model_weights(dense), args.dense, sigma, shapes, frequency, args.noise_std, args.seed)
    write_model(target, weights, sigma, domains, dense.tokenizer,
                f"inherit --dense {dense.info.weights_path} --config {args.config} --noise-std {args.noise_std} "
                f"--seed {args.seed}" + (f" --token-frequency {args.token_frequency}" if args.token_frequency else ""))
    print(f"wrote {target}: {_count(sigma):,} parameters; every expert of the {sigma.model.sparse_layers} sparse "
          f"layers starts as the dense FFN" + (f" plus noise of std {args.noise_std}" if args.noise_std else ""))
    return 0


def run_extract(args: argparse.Namespace) -> int:
    from mindformers_sigma.atomic import atomic_directory
    from mindformers_sigma.checkpoint.description import describe_checkpoint
    from mindformers_sigma.checkpoint.model import model_weights, write_model
    from mindformers_sigma.config import config_to_dict
    from mindformers_sigma.lifecycle.extract import extract_domain

    _new_folder(args.out)
    described = describe_checkpoint(args.ckpt)
    domain = described.domain_id(args.domain)
    _require_experts(described, args.ckpt)
    config, weights = extract_domain(described.config, model_weights(described), domain)
    import yaml

    with atomic_directory(args.out) as folder:
        write_model(os.path.join(folder, "model.ckpt"), weights, config, [args.domain],
                    described.tokenizer, f"extract --ckpt {described.info.weights_path} --domain "
                                                     f"{args.domain}")
        with open(os.path.join(folder, "config.yaml"), "w", encoding="utf-8") as handle:
            yaml.safe_dump(config_to_dict(config), handle, sort_keys=False)
        if described.tokenizer is not None:
            with open(os.path.join(folder, "tokenizer.model"), "wb") as handle:
                handle.write(described.tokenizer.model_bytes)
    full = _count(described.config)
    print(one_line(f"wrote {args.out}: domain {args.domain!r}, {_count(config):,} parameters "
                   f"({_count(config) / full:.1%} of the full model's {full:,})"))
    return 0


def run_add_domain(args: argparse.Namespace) -> int:
    from mindformers_sigma.checkpoint.description import describe_checkpoint
    from mindformers_sigma.checkpoint.model import model_weights, write_model
    from mindformers_sigma.lifecycle.add_domain import DENSE_INIT, add_domain, grown_config

    target = checkpoint_target(args.out)
    described = describe_checkpoint(args.ckpt)
    config = described.config
    _require_experts(described, args.ckpt)
    from mindformers_sigma.data.manifest import is_domain_name

    if not is_domain_name(args.name) or args.name == DENSE_INIT:
        raise UserError(f"--name {args.name[:80]!r}: a domain name is 1-64 letters, digits, '_' or '-' (and not 'dense')")
    if args.name in described.domains:
        raise UserError(f"--name {args.name!r}: already a domain of {args.ckpt} ({', '.join(described.domains)})")
    init_from = None if args.init_from == DENSE_INIT else described.domain_id(args.init_from, "--init-from")
    frequency = _frequency(args.token_frequency, described.domains, config.model.vocab_size,
                           described.tokenizer_model, only=args.name)
    seed = config.moe.routing_seed if args.seed is None else args.seed
    weights = add_domain(config, model_weights(described), init_from, frequency, seed)
    grown = grown_config(config)
    write_model(target, weights, grown, described.domains + [args.name], described.tokenizer,
                f"add-domain --ckpt {described.info.weights_path} --name {args.name} --init-from {args.init_from}")
    print(one_line(f"wrote {target}: domain {args.name!r} is id {config.moe.num_domains}, {grown.moe.num_experts} "
                   f"experts per sparse layer; routing rows drawn with seed {seed}"
                   + (f", balanced on {args.token_frequency}" if frequency is not None else ", uniform")))
    return 0


COMMANDS = (
    Command("inherit", "a PanGu-Σ checkpoint whose experts start as copies of a dense model's FFNs",
            add_inherit_arguments, run_inherit),
    Command("extract", "cut one domain's stand-alone sub-model out of a checkpoint", add_extract_arguments,
            run_extract),
    Command("add-domain", "add a domain (expert group and routing rows) to a checkpoint", add_add_domain_arguments,
            run_add_domain),
)
