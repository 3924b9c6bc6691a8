"""Generation: the KV cache against full recompute, left padding, sampling against the softmax, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import mindspore as ms
import pytest

from mindformers_sigma.checkpoint.description import describe_checkpoint
from mindformers_sigma.checkpoint.model import load_model
from mindformers_sigma.cli import main
from mindformers_sigma.generation.generator import Generator
from mindformers_sigma.generation.sampling import Sampling, next_tokens

from conftest import EOD

PROMPTS = {"code": "def insort(a, x", "en": "The ", "zh": "迈向充满"}


@pytest.fixture(scope="module")
def loaded(trained_sigma):
    ms.set_context(mode=ms.GRAPH_MODE)
    config, _, weights = trained_sigma
    described = describe_checkpoint(weights)
    return described, load_model(described)


def _prompts(described, extra=("bisect", "同胞们、朋友们", "import")):
    return [described.tokenizer.encode(text) for text in list(PROMPTS.values()) + list(extra)]


def _full_forward_logits(model, sequence, domain):
    """Next-token logits of ``sequence`` from the training forward on exactly its tokens (no padding)."""
    logits, _, _ = model.logits(ms.Tensor(np.asarray([sequence], np.int32)), ms.Tensor(np.asarray([domain], np.int32)))
    return logits.asnumpy()[0, -1].astype(np.float64)


def test_kv_cache_greedy_gives_the_tokens_of_full_recompute_on_every_domain(loaded):
    described, model = loaded
    seq = described.config.model.seq_length
    prompts = _prompts(described)
    assert len({len(p) for p in prompts}) > 2  # prompts of different lengths: left padding is exercised
    cached, full = Generator(model, seq, EOD, True), Generator(model, seq, EOD, False)
    for domain in range(3):
        with_cache = cached.generate(prompts, domain, 16, Sampling())
        reference = full.generate(prompts, domain, 16, Sampling())
        assert with_cache.tokens == reference.tokens
        assert sum(map(len, with_cache.tokens)) > len(prompts)  # something was generated past the first token
        # each row of the padded batch is what its prompt gives alone (up to the batch's room: seq_length minus
        # the longest prompt), and what the plain forward predicts
        room = seq - max(map(len, prompts))
        for prompt, made in zip(prompts, with_cache.tokens):
            alone = cached.generate([prompt], domain, 16, Sampling()).tokens[0]
            assert alone[:room] == made and (len(made) == room or len(alone) == len(made))
            sequence = prompt + made[:seq - len(prompt) - 1]
            expected = [int(np.argmax(_full_forward_logits(model, sequence[:n], domain)))
                        for n in range(len(prompt), len(sequence) + 1)]
            assert made == expected[:len(made)]
            assert len(made) == room or expected[len(made)] == EOD  # stopped by the window or by EOD


def test_cached_logits_equal_the_full_forward_at_every_step(loaded):
    """Compare the numbers, not only the argmax: prefill and each decode step against the training forward."""
    described, model = loaded
    from mindformers_sigma.generation import kv_cache

    seq = described.config.model.seq_length
    prompts = _prompts(described)[:4]
    sequences = [p + list(range(40, 40 + seq - max(map(len, prompts)))) for p in prompts]  # fixed continuations
    prefill, decode = kv_cache.Prefill(model), kv_cache.DecodeStep(model)
    domains = ms.Tensor(np.asarray([0, 1, 2, 1], np.int32))
    input_ids, positions, bias, last, pads = kv_cache.left_padded_window(prompts, seq)
    logits, keys, values = prefill(*map(ms.Tensor, (input_ids, positions, bias)), domains, ms.Tensor(last))
    longest = max(map(len, prompts))
    for step in range(seq - longest):
        got = logits.asnumpy()
        for row, sequence in enumerate(sequences):
            expected = _full_forward_logits(model, sequence[:len(prompts[row]) + step], int(domains.asnumpy()[row]))
            np.testing.assert_allclose(got[row], expected, rtol=0, atol=1e-4 * np.abs(expected).max())
        if step + 1 == seq - longest:
            break
        tokens = np.asarray([[s[len(p) + step]] for s, p in zip(sequences, prompts)], np.int32)
        pos, mask, step_bias = kv_cache.decode_inputs(longest + step, pads, seq)
        logits, keys, values = decode(ms.Tensor(tokens), *map(ms.Tensor, (pos, mask, step_bias)), domains,
                                      ms.mutable(keys), ms.mutable(values))


def test_sampling_with_a_seed_is_reproducible_and_differs_between_seeds(loaded):
    described, model = loaded
    seq = described.config.model.seq_length
    prompts = _prompts(described)
    sampling = Sampling(False, 1.2, 50, 0.95)
    cached, full = Generator(model, seq, EOD, True), Generator(model, seq, EOD, False)
    first = cached.generate(prompts, 1, 12, sampling, seed=7).tokens
    assert first == cached.generate(prompts, 1, 12, sampling, seed=7).tokens
    assert first == full.generate(prompts, 1, 12, sampling, seed=7).tokens  # same stream, same logits
    assert first != cached.generate(prompts, 1, 12, sampling, seed=8).tokens


def _chi_square(samples, probs):
    counts = np.bincount(samples, minlength=probs.shape[0])
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token outside the allowed set"
    expected = probs[support] * samples.shape[0]
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


# chi-square critical values at p = 0.001 by degrees of freedom
CRITICAL = {4: 18.47, 5: 20.52, 7: 24.32, 9: 27.88, 11: 31.26}


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 8, 1.0), (0.7, 10, 1.0), (1.5, 12, 0.8)])
def test_sampled_tokens_follow_the_models_softmax(loaded, temperature, top_k, top_p):
    """Draws from the model's next-token logits against the distribution computed here from the same logits."""
    described, model = loaded
    logits = _full_forward_logits(model, described.tokenizer.encode(PROMPTS["en"]), 1)
    order = np.argsort(-logits, kind="stable")
    allowed = order[:top_k]
    probs = np.zeros_like(logits)
    weights = np.exp((logits[allowed] - logits[allowed].max()) / temperature)
    probs[allowed] = weights / weights.sum()
    if top_p < 1:
        ranked = probs[allowed]
        keep = allowed[(np.cumsum(ranked) - ranked) < top_p]
        probs = np.where(np.isin(np.arange(probs.shape[0]), keep), probs, 0.0)
        probs /= probs.sum()
    draws = 40000
    samples = next_tokens(np.tile(logits.astype(np.float32), (draws, 1)), Sampling(False, temperature, top_k, top_p),
                          np.random.default_rng(11))
    statistic, freedom = _chi_square(samples, probs)
    assert freedom in CRITICAL and statistic < CRITICAL[freedom], (statistic, freedom)


def test_greedy_sampling_limits_are_the_argmax():
    logits = np.random.default_rng(0).normal(size=(5, 30)).astype(np.float32)
    best = logits.argmax(-1)
    assert (next_tokens(logits, Sampling(), None) == best).all()
    assert (next_tokens(logits, Sampling(False, 1.0, 1, 1.0), np.random.default_rng(0)) == best).all()
    assert (next_tokens(logits, Sampling(False, 1.0, 0, 1e-9), np.random.default_rng(0)) == best).all()


def _run(capsys, *args):
    code = main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_command_prints_the_continuation_and_its_speed(trained_sigma, capsys, tmp_path):
    _, _, weights = trained_sigma
    code, out, err = _run(capsys, "--ckpt", weights, "--domain", "code", "--prompt", PROMPTS["code"],
                          "--max-new-tokens", "8")
    assert code == 0 and out.startswith(PROMPTS["code"]) and len(out) > len(PROMPTS["code"]) + 1
    assert "prefill" in err and "decode" in err and "tokens/s" in err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS['code']}\n\n{PROMPTS['zh']}\n", encoding="utf-8-sig")  # a byte-order mark too
    code, cached_out, _ = _run(capsys, "--ckpt", weights, "--domain", "zh", "--prompt-file", str(prompts))
    assert code == 0 and cached_out.count("--- ") == 2 and f"{prompts}:3" in cached_out and "\ufeff" not in cached_out
    code, full_out, _ = _run(capsys, "--ckpt", weights, "--domain", "zh", "--prompt-file", str(prompts), "--no-cache")
    assert code == 0 and full_out == cached_out


@pytest.mark.parametrize("args, message", [
    (["--domain", "legal"], r"not a domain of .*; known: code, en, zh"),
    (["--prompt", ""], r"--prompt: the prompt is empty"),
    (["--prompt", "x" * 200], r"the prompt is \d+ tokens, the model's sequence length is 16; shorten it"),
    (["--prompt", "a <eod> b"], r"holds the end-of-document token"),
    (["--top-p", "0"], r"--top-p: expected a number in \(0, 1\]"),
    (["--top-p", "1.5"], r"--top-p: expected a number in \(0, 1\]"),
    (["--greedy", "--temperature", "0.5"], r"choose greedy decoding or sampling"),
    (["--max-new-tokens", "0"], r"--max-new-tokens: expected an integer"),
])
def test_generate_refuses_bad_input_in_one_line(trained_sigma, capsys, args, message):
    import re

    _, _, weights = trained_sigma
    base = {"--domain": "en", "--prompt": "The "}
    for flag in ("--domain", "--prompt"):
        if flag not in args:
            args = [flag, base[flag], *args]
    try:
        code, _, err = _run(capsys, "--ckpt", weights, *args)
    except SystemExit as stop:  # argparse refusals
        code, err = stop.code, capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_generate_refuses_a_checkpoint_of_another_config(trained_sigma, capsys, tmp_path):
    """An older checkpoint (its sidecar without config, domains, tokenizer) with the wrong --config."""
    import shutil

    import yaml

    from mindformers_sigma.config import config_to_dict

    config, prepared, weights = trained_sigma
    other = config_to_dict(config)
    other["model"]["ffn_hidden_size"] = 64
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other))
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(weights, old)
    sidecar = json.loads(open(weights.rsplit(".", 1)[0] + ".json", encoding="utf-8").read())
    for key in ("config", "domains", "tokenizer", "description_sha256"):
        sidecar.pop(key)
    (old / (weights.rsplit("/", 1)[1].rsplit(".", 1)[0] + ".json")).write_text(json.dumps(sidecar))
    old_weights = str(old / weights.rsplit("/", 1)[1])
    code, _, err = _run(capsys, "--ckpt", old_weights, "--domain", "en", "--prompt", "The ", "--config", str(path),
                        "--data", str(prepared))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "ffn.mapping.weight has shape (32, 48), the config's model needs (32, 64)" in err
    code, _, err = _run(capsys, "--ckpt", weights, "--domain", "en", "--prompt", "The ", "--config", str(path))
    assert code == 2 and "records its own config, domains and tokenizer; drop --config and --data" in err
