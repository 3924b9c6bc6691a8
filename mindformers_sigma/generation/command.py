"""`pangu-sigma generate`: text from a checkpoint, one domain, one prompt or a file of them."""

from __future__ import annotations

import argparse
import functools
import sys

from mindformers_sigma.arg_types import integer_in, number_in
from mindformers_sigma.errors import UserError, one_line
from mindformers_sigma.generation.sampling import Sampling
from mindformers_sigma.one_line_parser import Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a checkpoint (its .ckpt/.safetensors file or .json sidecar)")
    parser.add_argument("--domain", help="the domain whose experts generate (its name; optional for a dense or "
                                         "one-domain model)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--prompt-file", help="a UTF-8 file with one prompt per line (empty lines skipped)")
    parser.add_argument("--max-new-tokens", type=integer_in(1, 1_000_000), default=64,
                        help="stop after this many tokens (or at the end-of-document token, or the sequence length)")
    parser.add_argument("--greedy", action="store_true", help="always the most likely token (the default)")
    parser.add_argument("--temperature", type=number_in("[1e-6, 1e6]"), help="sample from softmax(logits / T)")
    parser.add_argument("--top-k", type=integer_in(0, 10_000_000), help="sample among the K most likely tokens (0: all)")
    parser.add_argument("--top-p", type=number_in("(0, 1]"), help="sample from the smallest set of tokens holding mass P")
    parser.add_argument("--seed", type=integer_in(0, 2 ** 63 - 1), default=0, help="the sampler's seed")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the whole sequence for every token (the KV cache's reference)")
    parser.add_argument("--batch-size", type=integer_in(1, 4096), default=8, help="prompts decoded together")
    parser.add_argument("--config", help="the config an older checkpoint (without its own) was trained with")
    parser.add_argument("--data", help="the prepare-data folder an older checkpoint was trained on")


def sampling_of(args: argparse.Namespace) -> Sampling:
    sampled = [flag for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                        ("--top-p", args.top_p)) if value is not None]
    if args.greedy and sampled:
        raise UserError(f"--greedy and {sampled[0]}: choose greedy decoding or sampling, not both")
    if not sampled:
        return Sampling()
    return Sampling(False, args.temperature or 1.0, args.top_k or 0, args.top_p or 1.0)


def run(args: argparse.Namespace) -> int:
    from mindformers_sigma.checkpoint.description import describe_checkpoint
    from mindformers_sigma.data.manifest import domains_and_tokenizer
    from mindformers_sigma.generation.prompts import encode_prompts, read_prompt_file

    sampling = sampling_of(args)
    described = describe_checkpoint(args.ckpt, args.config,
                                    functools.partial(domains_and_tokenizer, args.data) if args.data else None)
    domain_id = described.chosen_domain(args.domain)
    model_config = described.config.model
    texts = read_prompt_file(args.prompt_file) if args.prompt_file is not None else [("--prompt", args.prompt)]
    prompts = encode_prompts(texts, described.tokenizer, model_config.seq_length, model_config.eod_token_id)

    from mindformers_sigma.checkpoint.model import inference_config, load_model
    from mindformers_sigma.context import configure_context
    from mindformers_sigma.generation.generator import Generator

    configure_context(inference_config(described.config))
    generator = Generator(load_model(described), model_config.seq_length, model_config.eod_token_id,
                          use_cache=not args.no_cache)
    for first in range(0, len(prompts), args.batch_size):
        batch = prompts[first:first + args.batch_size]
        result = generator.generate(batch, domain_id, args.max_new_tokens, sampling, args.seed + first)
        for (where, _), prompt, new in zip(texts[first:first + args.batch_size], batch, result.tokens):
            if len(prompts) > 1:
                print(f"--- {where}")
            print(described.tokenizer.decode(prompt + new), flush=True)
        print(one_line(
            f"generate: {len(batch)} prompt(s), {result.prompt_tokens} prompt tokens, {sum(map(len, result.tokens))} "
            f"new tokens; prefill {result.prefill_tokens_per_second:,.0f} tokens/s, decode "
            f"{result.decode_tokens_per_second:,.0f} tokens/s ({'no cache' if args.no_cache else 'KV cache'}, "
            f"batch {len(batch)}; graph compile {result.compile_seconds:.1f}s excluded)"), file=sys.stderr)
    return 0


def add_tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a checkpoint whose tokenizer to use")
    parser.add_argument("--text", required=True, help="the text to encode")
    parser.add_argument("--json", action="store_true", help='print {"ids": [...]} instead of the ids on one line')


def run_tokenize(args: argparse.Namespace) -> int:
    import json

    from mindformers_sigma.checkpoint.description import describe_checkpoint
    from mindformers_sigma.errors import DataError
    from mindformers_sigma.generation.prompts import require_utf8

    text = require_utf8(args.text, "--text")
    described = describe_checkpoint(args.ckpt)
    if described.tokenizer is None:
        raise DataError(f"--ckpt {args.ckpt}: its model was trained on synthetic token ids and has no tokenizer")
    ids = described.tokenizer.encode(text)
    print(json.dumps({"ids": ids}) if args.json else " ".join(map(str, ids)))
    return 0


COMMANDS = (Command("generate", "continue prompts with a checkpoint's model (KV-cached decoding)", add_arguments, run),
            Command("tokenize", "the token ids a checkpoint's tokenizer gives a text", add_tokenize_arguments,
                    run_tokenize))
