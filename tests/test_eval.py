"""Evaluation: perplexity and zero-shot scores against direct model computations, and the commands."""

from __future__ import annotations

import json
import re

import numpy as np
import mindspore as ms
import pytest

from mindformers_sigma.checkpoint.description import describe_checkpoint
from mindformers_sigma.checkpoint.model import inference_config, load_model
from mindformers_sigma.cli import main
from mindformers_sigma.eval.make_task import make_records
from mindformers_sigma.eval.perplexity import domain_perplexity
from mindformers_sigma.eval.scoring import TokenLogProbs
from mindformers_sigma.eval.zeroshot import Record, continuation_rows, evaluate
from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM
from mindformers_sigma.training.trainer import train

from conftest import EOD, lifecycle_config, real_batch


@pytest.fixture(scope="module")
def model(trained_sigma):
    ms.set_context(mode=ms.GRAPH_MODE)
    _, _, weights = trained_sigma
    described = describe_checkpoint(weights)
    return described, load_model(described)


def _direct_log_probs(network, tokens, domain):
    """log p(token t+1 | tokens ..t) from the model's logits, softmax in float64 here."""
    logits, _, _ = network.logits(ms.Tensor(np.asarray([tokens[:-1]], np.int32)), ms.Tensor(np.asarray([domain], np.int32)))
    logits = logits.asnumpy()[0].astype(np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logits[np.arange(len(tokens) - 1), tokens[1:]] - log_z


def test_a_choices_loss_is_the_models_loss_on_its_tokens(model):
    described, network = model
    tokenizer, seq = described.tokenizer, described.config.model.seq_length
    record = Record("<test>", "def insort(a, x", ["):\n", " lo=0", "迈向"], 0, None)
    scorer = TokenLogProbs(network)
    result = evaluate(scorer, tokenizer, [record], 0, seq, "none", 4)
    losses = []
    for choice in record.choices:
        row, span = continuation_rows(tokenizer, record.context, choice, seq, "<test>")
        losses.append(-_direct_log_probs(network, row, 0)[-span:].sum())
    assert result.predictions == [int(np.argmin(losses))]
    # the per-choice numbers themselves, through the batched scorer (a padded batch of 4 rows)
    from mindformers_sigma.eval.scoring import score_rows

    rows = [continuation_rows(tokenizer, record.context, c, seq, "<test>") for c in record.choices]
    scored = score_rows(scorer, [r for r, _ in rows], [0, 0, 0], seq, 4)
    for (row, span), (log_probs, _), expected in zip(rows, scored, losses):
        assert abs(-log_probs[-span:].sum() - expected) <= 1e-5 * max(1.0, abs(expected)) * span


def test_perplexity_is_the_training_loss_exponentiated(model, real_corpus):
    described, network = model
    corpus, _ = real_corpus
    tokens, domains = real_batch(corpus, (3, 2, 3))
    assert (tokens[:, :-1] == EOD).any()
    scorer = TokenLogProbs(network)
    for domain in range(3):
        rows = tokens[domains == domain]
        result = domain_perplexity(scorer, "d", domain, rows, 16, EOD, batch_size=2)
        nll, counted, _, _ = network(ms.Tensor(rows), ms.Tensor(np.full(rows.shape[0], domain, np.int32)))
        assert result.tokens == int(counted.asnumpy()[domain]) == int((rows[:, :-1] != EOD).sum())
        assert result.perplexity == pytest.approx(np.exp(nll.asnumpy()[domain] / result.tokens), rel=1e-5)


def test_perplexity_of_uniform_random_tokens_at_initialisation_is_the_vocabulary_size(real_corpus):
    ms.set_context(mode=ms.GRAPH_MODE)
    _, prepared = real_corpus
    config = inference_config(lifecycle_config(prepared))
    network = PanGuSigmaForCausalLM(config)
    network.set_train(False)
    samples = np.random.default_rng(0).integers(7, 512, size=(32, 17)).astype(np.int32)
    result = domain_perplexity(TokenLogProbs(network), "random", 1, samples, 16, EOD, batch_size=8)
    assert result.tokens == 32 * 16
    assert 0.95 * 512 < result.perplexity < 1.05 * 512


@pytest.mark.slow
def test_perplexity_of_a_memorised_corpus_is_near_one(real_corpus, tmp_path):
    """The zh domain repeats four sentences: after training on it alone the model predicts it almost surely."""
    corpus, prepared = real_corpus
    config = lifecycle_config(prepared, data={"domain_weights": {"code": 0, "en": 0, "zh": 1}},
                              train={"steps": 150, "learning_rate": 5e-3, "min_learning_rate": 1e-3,
                                     "weight_decay": 0.0})
    summary = train(config, out_dir=str(tmp_path / "run"), log=lambda line: None)
    network = load_model(describe_checkpoint(summary.checkpoint))
    result = domain_perplexity(TokenLogProbs(network), "zh", 2, corpus.samples[2], 16, EOD, batch_size=8)
    assert result.perplexity < 1.3, result.perplexity


@pytest.fixture(scope="module")
def heldout_data(real_corpus, tmp_path_factory):
    """The real corpus again, prepared with the trained model's tokenizer and a third of each domain held out."""
    from mindformers_sigma.data.prepare import prepare_data

    _, prepared = real_corpus
    root = prepared.parent
    out = tmp_path_factory.mktemp("heldout") / "data"
    prepare_data([("code", str(root / "code.txt")), ("en", str(root / "en.jsonl")), ("zh", str(root / "zh.jsonl"))],
                 str(out), 16, tokenizer_path=str(prepared / "tokenizer.model"), holdout=0.3)
    return out


def _cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_perplexity_command_reports_every_domain_and_overall(trained_sigma, heldout_data, capsys):
    _, _, weights = trained_sigma
    code, out, err = _cli(capsys, "eval", "perplexity", "--ckpt", weights, "--data", str(heldout_data), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["split"] == "heldout" and set(report["domains"]) == {"en", "zh", "overall"} | (
        {"code"} if report["domains"].get("code") else set())
    total = report["domains"]["overall"]
    parts = [v for k, v in report["domains"].items() if k != "overall"]
    assert total["tokens"] == sum(p["tokens"] for p in parts)
    assert total["perplexity"] == pytest.approx(np.exp(sum(p["mean_nll"] * p["tokens"] for p in parts) / total["tokens"]))


def test_make_task_then_zeroshot_scores_against_chance(trained_sigma, heldout_data, capsys, tmp_path):
    _, _, weights = trained_sigma
    task = tmp_path / "en.jsonl"
    code, out, err = _cli(capsys, "make-task", "--data", str(heldout_data), "--domain", "en", "--out", str(task),
                          "--choices", "3", "--n", "20", "--context-tokens", "6", "--continuation-tokens", "4")
    assert code == 0, err
    records = [json.loads(line) for line in task.read_text().splitlines()]
    assert records and all(len(r["choices"]) == 3 and 0 <= r["label"] < 3 for r in records)
    assert len({r["label"] for r in records}) > 1  # the right answer's place varies
    code, _, err = _cli(capsys, "make-task", "--data", str(heldout_data), "--domain", "en", "--out", str(task))
    assert code == 2 and "exists; choose a new name" in err  # never overwritten
    code, _, err = _cli(capsys, "make-task", "--data", str(heldout_data), "--domain", "en", "--out",
                        str(tmp_path / "long.jsonl"), "--context-tokens", "16", "--continuation-tokens", "4")
    assert code == 2 and "contexts would be cut" in err and not (tmp_path / "long.jsonl").exists()
    task.write_bytes(b"\xef\xbb\xbf" + task.read_bytes())  # saved by an editor with a byte-order mark
    code, out, err = _cli(capsys, "eval", "zeroshot", "--ckpt", weights, "--task", str(task), "--domain", "en",
                          "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["records"] == len(records) and result["chance"] == pytest.approx(1 / 3)
    assert result["ci95"][0] <= result["accuracy"] <= result["ci95"][1]


class _PositionTokenizer:
    """Decodes ids to their numbers, so a choice tells which document and position it was cut from."""

    @staticmethod
    def decode(ids):
        return " ".join(str(int(i)) for i in ids)


def test_wrong_choices_are_other_documents_continuations_cut_where_the_right_one_is():
    """Right and wrong choices drawn alike, so a model blind to the context is at chance."""
    context_tokens, continuation_tokens, choices = 5, 3, 4
    need = context_tokens + continuation_tokens
    # 60 documents of 1-3 passages each; token = 1000 * document + position + 10 (never EOD)
    documents = [[1000 * d + t + 10 for t in range(need * (1 + d % 3) + d % 2)] for d in range(60)]
    stream = np.asarray([t for doc in documents for t in doc + [EOD]], np.int64)
    samples = np.concatenate([stream, np.full(-len(stream) % 17, EOD)]).reshape(-1, 17)
    records = make_records(samples, _PositionTokenizer(), "x", choices, 500, context_tokens, continuation_tokens, 3)
    assert len(records) == sum(len(doc) // need for doc in documents)  # one record per passage
    for record in records:
        context = [int(t) for t in record["context"].split()]
        spans = [[int(t) for t in choice.split()] for choice in record["choices"]]
        assert spans[record["label"]] == list(range(context[-1] + 1, context[-1] + 1 + continuation_tokens))
        for span in spans:  # every choice sits where a continuation sits in its passage
            assert (span[0] % 1000 - 10) % need == context_tokens and len(span) == continuation_tokens
        own = spans[record["label"]][0] // 1000
        assert all(span[0] // 1000 != own for i, span in enumerate(spans) if i != record["label"])
    assert len({record["label"] for record in records}) == choices


@pytest.mark.parametrize("line, problem", [
    ('{"context": "a", "choices": ["b"], "label": 0}', r"choices: must be a list of at least 2"),
    ('{"context": "a", "choices": ["b", "c"], "label": 2}', r"label: must be an integer in \[0, 1\]"),
    ('{"choices": ["b", "c"], "label": 0}', r"context: missing"),
    ('{"context": "a", "answer": ""}', r"answer: must be a non-empty string"),
    ('{"context": "a", ', r"not valid JSON"),
    ('{"context": "a", "choices": ["b", "b"], "label": 0}', r"choices: two are the same text"),
    ('{"context": "a", "choices": ["b", "c"], "label": 0, "answer": "b"}', r"give choices and label .* not both"),
])
def test_a_bad_task_record_is_one_line_naming_file_and_line(trained_sigma, capsys, tmp_path, line, problem):
    _, _, weights = trained_sigma
    task = tmp_path / "task.jsonl"
    task.write_text('{"context": "x", "choices": ["y", "z"], "label": 1}\n\n' + line + "\n")
    code, _, err = _cli(capsys, "eval", "zeroshot", "--ckpt", weights, "--task", str(task), "--domain", "en")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(re.escape(f"{task}:3: ") + problem, err), err
