"""`pangu-sigma import pangu-alpha` and `pangu-sigma export pangu-alpha`: the official releases in and out."""

from __future__ import annotations

import argparse
import os
import sys

from mindformers_sigma.errors import DataError, UserError, one_line
from mindformers_sigma.one_line_parser import Command, add_commands


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    from mindformers_sigma.pangu_alpha.conversion import PRESETS

    parser.add_argument("--ckpt", required=True, help="a PanGu-α .ckpt file, or a release folder (one .ckpt, or "
                                                      "per-rank parts with --strategy; PCL's *_embedding.npy tables)")
    parser.add_argument("--out", required=True, help="the checkpoint to write: NAME.ckpt or NAME.safetensors")
    heads = parser.add_mutually_exclusive_group(required=True)
    heads.add_argument("--num-heads", type=int, help="attention heads (not stored in any tensor)")
    heads.add_argument("--preset", choices=sorted(PRESETS), help="a released size: 2.6b (32 layers, hidden 2560, "
                                                                 "32 heads) or 13b (40 layers, hidden 5120, 40 heads)")
    parser.add_argument("--tokenizer", help="PanGu-α's vocab.model (default: the one the pcl-pangu package ships)")
    parser.add_argument("--strategy", help="the strategy file a sharded release's parts were saved with")
    parser.add_argument("--activation", choices=("gelu", "fast_gelu"), default="gelu",
                        help="the FFN activation the release computes: gelu (nn.GELU, the PCL and models-repo code; "
                             "default) or fast_gelu (MindFormers' hidden_act default)")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    from mindformers_sigma.pangu_alpha.namings import EXPORT_NAMINGS

    parser.add_argument("--ckpt", required=True,
                        help="a dense PanGu-α checkpoint of this project (model.sparse_layers 0)")
    parser.add_argument("--out", required=True, help="the .ckpt file to write, with the official names")
    parser.add_argument("--naming", choices=EXPORT_NAMINGS, default="pcl",
                        help="pcl (the pcl-pangu release; default) or mindformers (models repo / MindFormers)")


def run_import(args: argparse.Namespace) -> int:
    from mindformers_sigma.checkpoint.model import write_model
    from mindformers_sigma.checkpoint.target import checkpoint_target
    from mindformers_sigma.pangu_alpha import conversion
    from mindformers_sigma.pangu_alpha.release_files import place_tables, read_release
    from mindformers_sigma.params import count_parameters
    from mindformers_sigma.tokenizer.kinds import pcl_pangu_vocabulary, read_tokenizer
    from mindformers_sigma.tokenizer.pangu_alpha import KIND

    if args.num_heads is not None and args.num_heads < 1:
        raise UserError(f"--num-heads {args.num_heads}: must be >= 1")
    target = checkpoint_target(args.out)
    vocabulary = args.tokenizer or pcl_pangu_vocabulary()
    tokenizer = read_tokenizer(vocabulary, KIND, "--tokenizer" if args.tokenizer else "")
    weights, tables = read_release(args.ckpt, args.strategy, os.path.dirname(os.path.abspath(target)))
    naming = conversion.detect_naming(weights, args.ckpt)
    place_tables(weights, tables, naming)
    num_layers = conversion.count_layers(weights, args.ckpt)
    heads = args.num_heads
    if args.preset is not None:
        heads = conversion.check_preset(args.preset, num_layers, weights, naming, args.ckpt)
    config = conversion.imported_config(weights, naming, num_layers, heads, args.activation, tokenizer.eod_id,
                                        args.ckpt)
    if tokenizer.vocab_size != config.model.vocab_size:
        raise DataError(f"--tokenizer {vocabulary}: has {tokenizer.vocab_size} pieces, "
                        f"the word table of {args.ckpt} has {config.model.vocab_size} rows; give the vocabulary the "
                        f"release was trained with")
    ours = conversion.to_project(weights, naming, config, args.ckpt)
    del weights
    write_model(target, ours, config, [conversion.DOMAIN], tokenizer,
                f"import pangu-alpha --ckpt {args.ckpt} ({naming.name} naming) --num-heads {heads} --activation "
                f"{args.activation}")
    m = config.model
    print(one_line(f"wrote {target}: PanGu-α ({naming.name} naming), {count_parameters(config).total:,} parameters, "
                   f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads, FFN {m.ffn_hidden_size}, "
                   f"vocabulary {m.vocab_size}, sequence {m.seq_length}, {m.activation}"))
    return 0


def run_export(args: argparse.Namespace) -> int:
    import mindspore as ms

    from mindformers_sigma.atomic import atomic_file
    from mindformers_sigma.checkpoint.description import describe_checkpoint
    from mindformers_sigma.checkpoint.model import model_weights
    from mindformers_sigma.checkpoint.target import checkpoint_target
    from mindformers_sigma.pangu_alpha.conversion import from_project
    from mindformers_sigma.pangu_alpha.namings import NAMINGS
    from mindformers_sigma.tokenizer.pangu_alpha import KIND

    if not args.out.endswith(".ckpt"):
        raise UserError(f"--out {args.out}: name the .ckpt file to write")
    checkpoint_target(args.out)
    described = describe_checkpoint(args.ckpt)
    model = described.config.model
    if model.sparse_layers:
        raise DataError(f"--ckpt {args.ckpt}: has {model.sparse_layers} sparse layers; PanGu-α is dense, so only a "
                        f"dense model (model.sparse_layers 0, e.g. one import pangu-alpha wrote) can be exported")
    if described.tokenizer is None or described.tokenizer.kind != KIND:
        print(one_line(f"export: warning: {args.ckpt} does not use PanGu-α's tokenizer, so the official code, which "
                       f"tokenizes with it, would feed the exported model other ids"), file=sys.stderr)
    official = from_project(model_weights(described), NAMINGS[args.naming], model.num_layers)
    with atomic_file(args.out) as tmp:
        ms.save_checkpoint([{"name": name, "data": ms.Tensor(value)} for name, value in official.items()], tmp)
    print(one_line(f"wrote {args.out}: {len(official)} tensors in the {args.naming} naming "
                   f"(num_heads {model.num_heads}, activation {model.activation}: pass them to the official code)"))
    return 0


IMPORTS = (Command("pangu-alpha", "an official MindSpore PanGu-α checkpoint as this project's dense model",
                   add_import_arguments, run_import),)
EXPORTS = (Command("pangu-alpha", "a dense model as an official MindSpore PanGu-α checkpoint", add_export_arguments,
                   run_export),)
COMMANDS = (
    Command("import", "bring in another release's checkpoint", lambda parser: add_commands(parser, IMPORTS, "source"),
            lambda args: args.run_source(args)),
    Command("export", "write a checkpoint in another release's format",
            lambda parser: add_commands(parser, EXPORTS, "format"), lambda args: args.run_format(args)),
)
