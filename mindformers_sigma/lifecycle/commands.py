"""`pangu-sigma inherit | extract | add-domain`: each reads one checkpoint and writes another, atomically."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional

import numpy as np

from mindformers_sigma.errors import DataError, UserError, one_line


def _noise(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= 10):
        raise argparse.ArgumentTypeError(f"expected a standard deviation in [0, 10], got {text!r}")
    return value


def _seed(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 2 ** 31 - 1:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2147483647], got {text!r}")
    return int(text)


def _checkpoint_target(path: str) -> str:
    """--out for a checkpoint: NAME.ckpt or NAME.safetensors in an existing folder, not yet taken."""
    if not path.endswith((".ckpt", ".safetensors")):
        raise UserError(f"--out {path}: name the checkpoint file to write, ending in .ckpt or .safetensors")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--out {path}: its folder {folder} does not exist; create it first")
    for taken in (path, os.path.splitext(path)[0] + ".json"):
        if os.path.exists(taken):
            raise UserError(f"--out {path}: {taken} exists; choose a new name (nothing is overwritten)")
    return path


def add_inherit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dense", required=True, help="a dense PanGu-α checkpoint (model.sparse_layers 0)")
    parser.add_argument("--config", required=True, help="the PanGu-Σ config to build (same backbone shapes)")
    parser.add_argument("--out", required=True, help="the checkpoint to write: NAME.ckpt or NAME.safetensors")
    parser.add_argument("--noise-std", type=_noise, default=0.0, help="Gaussian noise added to each expert's "
                                                                      "matrices (default 0: exact copies)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the noise")
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
    parser.add_argument("--seed", type=_seed, help="seed of the new routing rows (default: moe.routing_seed)")


def _frequency(data_dir: Optional[str], num_domains: int, vocab_size: int, only: Optional[str] = None):
    """Per-domain token counts of a prepare-data folder ([num_domains, V]), or the row of domain ``only``."""
    if data_dir is None:
        return None
    from mindformers_sigma.data.dataset import PreparedCorpus

    corpus = PreparedCorpus(data_dir)
    if corpus.vocab_size > vocab_size:
        raise DataError(f"--token-frequency {data_dir}: its tokenizer has {corpus.vocab_size} tokens, the model "
                        f"{vocab_size}; prepare it with the checkpoint's tokenizer (prepare-data --tokenizer)")
    if only is None:
        if len(corpus.names) > num_domains:
            raise DataError(f"--token-frequency {data_dir}: {len(corpus.names)} domains, the config has {num_domains}")
        return corpus.token_frequency(num_domains, vocab_size)
    if only not in corpus.names and len(corpus.names) != 1:
        raise DataError(f"--token-frequency {data_dir}: holds no domain {only!r} (has {', '.join(corpus.names)}); "
                        f"prepare the new domain's text under that name")
    return corpus.token_frequency(len(corpus.names), vocab_size)[corpus.names.index(only) if only in corpus.names else 0]


def _described_tokenizer(described) -> Optional[bytes]:
    return described.tokenizer.model_bytes if described.tokenizer is not None else None


def _count(config) -> int:
    from mindformers_sigma.params import count_parameters

    return count_parameters(config).total


def run_inherit(args: argparse.Namespace) -> int:
    from mindformers_sigma.config import load_config
    from mindformers_sigma.lifecycle.inherit import check_same_backbone, inherit_weights
    from mindformers_sigma.lifecycle.model_checkpoint import inference_config, model_weights, write_model
    from mindformers_sigma.parallel.layouts import parameter_layouts
    from mindformers_sigma.training.description import describe_checkpoint

    target = _checkpoint_target(args.out)
    sigma = load_config(args.config)
    dense = describe_checkpoint(args.dense, args.dense_config)
    check_same_backbone(dense.config, sigma, args.dense)
    shapes = {layout.name: layout.shape for layout in parameter_layouts(inference_config(sigma))
              if layout.name.startswith("backbone.")}
    frequency = _frequency(args.token_frequency, sigma.moe.num_domains, sigma.model.vocab_size)
    if frequency is None and sigma.moe.table_balance == "frequency":
        print("inherit: no --token-frequency: the routing tables are drawn uniformly (moe.table_balance frequency "
              "needs the data's token counts)", file=sys.stderr)
    weights = inherit_weights(model_weights(dense), args.dense, sigma, shapes, frequency, args.noise_std, args.seed)
    domains = dense.domains[:sigma.moe.num_domains]
    write_model(target, weights, sigma, domains, _described_tokenizer(dense),
                f"inherit --dense {dense.info.weights_path} --noise-std {args.noise_std}")
    print(f"wrote {target}: {_count(sigma):,} parameters; every expert of the {sigma.model.sparse_layers} sparse "
          f"layers starts as the dense FFN" + (f" plus noise of std {args.noise_std}" if args.noise_std else ""))
    return 0


def run_extract(args: argparse.Namespace) -> int:
    from mindformers_sigma.atomic import atomic_directory
    from mindformers_sigma.config import config_to_dict
    from mindformers_sigma.lifecycle.extract import extract_domain
    from mindformers_sigma.lifecycle.model_checkpoint import model_weights, write_model
    from mindformers_sigma.training.description import describe_checkpoint

    if os.path.exists(args.out):
        raise UserError(f"--out {args.out}: exists; give a new folder for the sub-model (nothing is overwritten)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UserError(f"--out {args.out}: its parent folder does not exist; create it first")
    described = describe_checkpoint(args.ckpt)
    domain = described.domain_id(args.domain)
    if described.config.moe.router != "rre":
        raise DataError(f"--ckpt {args.ckpt}: moe.router is {described.config.moe.router!r}; only RRE models have "
                        f"per-domain experts to extract")
    config, weights = extract_domain(described.config, model_weights(described), domain)
    import yaml

    with atomic_directory(args.out) as folder:
        write_model(os.path.join(folder, "model.ckpt"), weights, config, [args.domain],
                    _described_tokenizer(described), f"extract --ckpt {described.info.weights_path} --domain "
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
    from mindformers_sigma.lifecycle.add_domain import DENSE_INIT, add_domain, grown_config
    from mindformers_sigma.lifecycle.model_checkpoint import model_weights, write_model
    from mindformers_sigma.training.description import describe_checkpoint

    target = _checkpoint_target(args.out)
    described = describe_checkpoint(args.ckpt)
    config = described.config
    if config.moe.router != "rre":
        raise DataError(f"--ckpt {args.ckpt}: moe.router is {config.moe.router!r}; domains are an RRE notion")
    from mindformers_sigma.data.manifest import is_domain_name

    if not is_domain_name(args.name) or args.name == DENSE_INIT:
        raise UserError(f"--name {args.name!r}: a domain name is letters, digits, '_' or '-' (and not 'dense')")
    if args.name in described.domains:
        raise UserError(f"--name {args.name!r}: already a domain of {args.ckpt} ({', '.join(described.domains)})")
    init_from = None if args.init_from == DENSE_INIT else described.domain_id(args.init_from)
    frequency = _frequency(args.token_frequency, 1, config.model.vocab_size, only=args.name)
    seed = config.moe.routing_seed if args.seed is None else args.seed
    weights = add_domain(config, model_weights(described), init_from, frequency, seed)
    grown = grown_config(config)
    write_model(target, weights, grown, described.domains + [args.name], _described_tokenizer(described),
                f"add-domain --ckpt {described.info.weights_path} --name {args.name} --init-from {args.init_from}")
    print(one_line(f"wrote {target}: domain {args.name!r} is id {config.moe.num_domains}, {grown.moe.num_experts} "
                   f"experts per sparse layer; routing rows drawn with seed {seed}"
                   + (f", balanced on {args.token_frequency}" if frequency is not None else ", uniform")))
    return 0
