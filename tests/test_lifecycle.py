"""The RRE lifecycle after real training: extract a domain, inherit from a dense model, add a domain."""

from __future__ import annotations

import os
import re

import numpy as np
import mindspore as ms
import pytest
import yaml

from mindformers_sigma.checkpoint.description import describe_checkpoint
from mindformers_sigma.checkpoint.model import load_model, model_weights
from mindformers_sigma.cli import main
from mindformers_sigma.config import config_to_dict, load_config
from mindformers_sigma.data.prepare import prepare_data
from mindformers_sigma.generation.generator import Generator
from mindformers_sigma.generation.sampling import Sampling
from mindformers_sigma.lifecycle.inherit import check_same_backbone
from mindformers_sigma.params import count_parameters
from mindformers_sigma.training.trainer import train

from conftest import CONFIGS, EOD, lifecycle_config, real_batch

pytestmark = pytest.mark.slow


def _logits(model, tokens, domain):
    inputs = ms.Tensor(tokens[:, :-1])
    logits, _, _ = model.logits(inputs, ms.Tensor(np.full(tokens.shape[0], domain, np.int32)))
    return logits.asnumpy()


def _domain_rows(corpus, domain, count=3):
    """Real samples of ``domain`` (inputs holding an end of document where the domain has one)."""
    counts = [0, 0, 0]
    counts[domain] = count
    return real_batch(corpus, tuple(counts))[0]


def _cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _one_domain_corpus(root, name, source, tokenizer, seq=16):
    out = root / f"prepared_{name}"
    prepare_data([(name, str(source))], str(out), seq, tokenizer_path=str(tokenizer))
    return out


@pytest.fixture(scope="module")
def full(trained_sigma):
    ms.set_context(mode=ms.GRAPH_MODE)
    _, _, weights = trained_sigma
    described = describe_checkpoint(weights)
    return described, load_model(described)


def test_an_extracted_domain_computes_the_full_models_logits_and_tokens(trained_sigma, full, real_corpus, capsys,
                                                                         tmp_path):
    corpus, _ = real_corpus
    config, prepared, weights = trained_sigma
    described, model = full
    for domain, name in enumerate(["code", "en", "zh"]):
        out = tmp_path / f"sub_{name}"
        code, printed, err = _cli(capsys, "extract", "--ckpt", weights, "--domain", name, "--out", str(out))
        assert code == 0, err
        assert sorted(os.listdir(out)) == ["config.yaml", "model.ckpt", "model.json", "tokenizer.model"]
        sub_described = describe_checkpoint(str(out / "model.ckpt"))
        assert sub_described.domains == [name] and sub_described.config.moe.num_experts == 2
        sub = load_model(sub_described)
        # its parameter count: the full model's one-domain count, and what the sub-model really holds
        held = sum(p.size for p in sub.trainable_params())
        assert held == count_parameters(config).domain_submodel
        assert f"{held:,} parameters" in printed
        tokens = _domain_rows(corpus, domain)
        assert (tokens[:, :-1] == EOD).any()
        expected = _logits(model, tokens, domain)
        got = _logits(sub, tokens, 0)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
        prompts = [described.tokenizer.encode(text) for text in ("def f(", "The ", "迈向")]
        assert (Generator(sub, 16, EOD).generate(prompts, 0, 12, Sampling()).tokens
                == Generator(model, 16, EOD).generate(prompts, domain, 12, Sampling()).tokens)
    # the sub-model stands alone: its config file loads, it generates, and it trains on its domain's data
    assert load_config(str(tmp_path / "sub_en" / "config.yaml")).moe.num_domains == 1
    code, text, _ = _cli(capsys, "generate", "--ckpt", str(tmp_path / "sub_en" / "model.json"), "--domain", "en",
                         "--prompt", "The ", "--max-new-tokens", "4")
    assert code == 0 and text.startswith("The ")
    en_only = _one_domain_corpus(tmp_path, "en", _corpus_file(prepared, "en"), tmp_path / "sub_en" / "tokenizer.model")
    code, _, err = _cli(capsys, "train", "--resume", str(tmp_path / "sub_en" / "model.ckpt"), "--data", str(en_only),
                        "--steps", "3", "--out", str(tmp_path / "sub_en_run"))
    assert code == 0, err
    assert os.path.isfile(tmp_path / "sub_en_run" / "checkpoints" / "step_00000003.json")


def _corpus_file(prepared, name):
    """The source file that prepare-data read for domain ``name`` of the real corpus."""
    return prepared.parent / {"code": "code.txt", "en": "en.jsonl", "zh": "zh.jsonl"}[name]


def test_extract_refuses_an_unknown_domain_and_a_used_folder(trained_sigma, capsys, tmp_path):
    _, _, weights = trained_sigma
    code, _, err = _cli(capsys, "extract", "--ckpt", weights, "--domain", "legal", "--out", str(tmp_path / "x"))
    assert code == 2 and re.search(r"not a domain of .*known: code, en, zh", err) and not (tmp_path / "x").exists()
    code, _, err = _cli(capsys, "extract", "--ckpt", weights, "--domain", "en", "--out", str(tmp_path))
    assert code == 2 and "exists; give a new folder" in err


@pytest.fixture(scope="module")
def dense_checkpoint(real_corpus, tmp_path_factory):
    """A dense PanGu-α of the micro backbone (3 dense layers), really trained on the three-domain corpus."""
    _, prepared = real_corpus
    config = lifecycle_config(prepared, model={"dense_layers": 3, "sparse_layers": 0},
                              moe={"num_experts": 3, "experts_per_domain": 1}, train={"steps": 40})
    summary = train(config, out_dir=str(tmp_path_factory.mktemp("dense")), log=lambda line: None)
    assert summary.final_loss < summary.first_loss - 1.0
    return summary.checkpoint


def _sigma_yaml(tmp_path, prepared, **sections):
    path = tmp_path / "sigma.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(lifecycle_config(prepared, **sections))))
    return path


def test_an_inherited_sparse_model_computes_the_dense_models_logits_on_every_domain(
        dense_checkpoint, real_corpus, capsys, tmp_path):
    corpus, prepared = real_corpus
    sigma = _sigma_yaml(tmp_path, prepared)
    out = tmp_path / "inherited.ckpt"
    code, printed, err = _cli(capsys, "inherit", "--dense", dense_checkpoint, "--config", str(sigma), "--out", str(out),
                              "--token-frequency", str(prepared))
    assert code == 0, err
    dense = load_model(describe_checkpoint(dense_checkpoint))
    inherited_described = describe_checkpoint(str(out))
    assert inherited_described.domains == ["code", "en", "zh"]
    inherited = load_model(inherited_described)
    weights = model_weights(inherited_described)
    assert not np.array_equal(weights["backbone.layers.1.ffn.router.routing_table"][0],
                              weights["backbone.layers.1.ffn.router.routing_table"][1] - 2)  # real RRE tables
    for domain in range(3):
        tokens = _domain_rows(corpus, domain)
        expected = _logits(dense, tokens, domain)
        np.testing.assert_allclose(_logits(inherited, tokens, domain), expected, rtol=0,
                                   atol=1e-5 * np.abs(expected).max())
    noisy = tmp_path / "noisy.safetensors"
    code, _, err = _cli(capsys, "inherit", "--dense", dense_checkpoint, "--config", str(sigma), "--out", str(noisy),
                        "--noise-std", "0.05", "--seed", "3")
    assert code == 0, err
    tokens = _domain_rows(corpus, 1)
    drift = np.abs(_logits(load_model(describe_checkpoint(str(noisy))), tokens, 1) - _logits(dense, tokens, 1)).max()
    assert drift > 1e-3  # the noise reaches the logits: the experts are no longer exact copies
    # the sigma model trains from the inherited checkpoint with fresh optimizer state
    code, _, err = _cli(capsys, "train", "--resume", str(out), "--data", str(prepared), "--steps", "2",
                        "--out", str(tmp_path / "run"))
    assert code == 0, err


def test_inherit_refuses_another_backbone_in_one_line(dense_checkpoint, real_corpus, capsys, tmp_path):
    _, prepared = real_corpus
    sigma = _sigma_yaml(tmp_path, prepared, model={"ffn_hidden_size": 64})
    out = tmp_path / "x.ckpt"
    code, _, err = _cli(capsys, "inherit", "--dense", dense_checkpoint, "--config", str(sigma), "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "model.ffn_hidden_size is 48" in err and "has 64" in err and not out.exists()


def test_the_tiny_alpha_config_is_the_dense_twin_of_the_tiny_sigma_config():
    alpha, sigma = load_config(CONFIGS / "pangu_alpha_tiny_cpu.yaml"), load_config(CONFIGS / "pangu_sigma_tiny_cpu.yaml")
    check_same_backbone(alpha, sigma, "pangu_alpha_tiny_cpu.yaml")  # raises on any difference
    alpha_count, sigma_count = count_parameters(alpha), count_parameters(sigma)
    assert alpha_count.dense_layer == sigma_count.dense_layer and alpha_count.embeddings == sigma_count.embeddings


def _old_domain_logits(model, corpus):
    return [_logits(model, _domain_rows(corpus, domain), domain) for domain in range(3)]


def test_adding_a_domain_leaves_old_domains_bit_identical_before_and_after_frozen_training(
        trained_sigma, full, real_corpus, capsys, tmp_path):
    corpus, _ = real_corpus
    _, prepared, weights = trained_sigma
    described, model = full
    before = _old_domain_logits(model, corpus)
    import sysconfig

    legal_text = tmp_path / "legal.txt"
    legal_text.write_text(open(os.path.join(sysconfig.get_paths()["stdlib"], "heapq.py"), encoding="utf-8").read())
    legal = _one_domain_corpus(tmp_path, "legal", legal_text, prepared / "tokenizer.model")
    out = tmp_path / "grown.ckpt"
    code, printed, err = _cli(capsys, "add-domain", "--ckpt", weights, "--name", "legal", "--init-from", "en",
                              "--out", str(out), "--token-frequency", str(legal))
    assert code == 0, err
    assert "domain 'legal' is id 3, 8 experts" in printed
    grown = describe_checkpoint(str(out))
    assert grown.domains == ["code", "en", "zh", "legal"]
    grown_model = load_model(grown)
    for old, new in zip(before, _old_domain_logits(grown_model, corpus)):
        assert np.array_equal(old, new)
    grown_weights = model_weights(grown)
    for layer in ("backbone.layers.1.", "backbone.top_query_layer."):
        np.testing.assert_array_equal(grown_weights[layer + "ffn.experts.w1"][6:8],
                                      grown_weights[layer + "ffn.experts.w1"][2:4])  # copied from en
        assert set(np.unique(grown_weights[layer + "ffn.router.routing_table"][3])) == {6, 7}

    # train only the new domain, shared layers frozen: the old domains stay bit-identical, the new one moves
    frozen_run = tmp_path / "frozen"
    code, _, err = _cli(capsys, "train", "--resume", str(out), "--data", str(legal), "--steps", "6",
                        "--out", str(frozen_run), "--set", "train.freeze_shared=true")
    assert code == 0, err
    frozen = describe_checkpoint(str(frozen_run / "checkpoints" / "step_00000006.json"))
    frozen_model = load_model(frozen)
    for old, new in zip(before, _old_domain_logits(frozen_model, corpus)):
        assert np.array_equal(old, new)
    frozen_weights = model_weights(frozen)
    changed = [name for name in grown_weights if not np.array_equal(grown_weights[name], frozen_weights[name])]
    assert changed and all(".ffn.experts." in name for name in changed)
    for name in changed:
        np.testing.assert_array_equal(frozen_weights[name][:6], grown_weights[name][:6])  # old groups untouched
    legal_tokens = np.stack([row for row in _legal_rows(legal)])
    assert not np.array_equal(_logits(grown_model, legal_tokens, 3), _logits(frozen_model, legal_tokens, 3))

    # without freezing, the shared layers move and the old domains drift: measured, not hidden
    free_run = tmp_path / "free"
    code, _, err = _cli(capsys, "train", "--resume", str(out), "--data", str(legal), "--steps", "6",
                        "--out", str(free_run))
    assert code == 0, err
    free_model = load_model(describe_checkpoint(str(free_run / "checkpoints" / "step_00000006.json")))
    drift = [float(np.abs(new - old).max() / np.abs(old).max())
             for old, new in zip(before, _old_domain_logits(free_model, corpus))]
    print(f"old-domain logit drift after 6 unfrozen steps on the new domain: {drift}")
    assert min(drift) > 1e-4


def _legal_rows(prepared_dir):
    from mindformers_sigma.data.dataset import PreparedCorpus

    return PreparedCorpus(str(prepared_dir)).samples[0][:3]


def test_add_domain_refuses_a_taken_name_and_an_existing_output(trained_sigma, capsys, tmp_path):
    _, _, weights = trained_sigma
    code, _, err = _cli(capsys, "add-domain", "--ckpt", weights, "--name", "en", "--init-from", "dense",
                        "--out", str(tmp_path / "g.ckpt"))
    assert code == 2 and "already a domain" in err
    (tmp_path / "g.json").write_text("{}")
    code, _, err = _cli(capsys, "add-domain", "--ckpt", weights, "--name", "news", "--init-from", "dense",
                        "--out", str(tmp_path / "g.ckpt"))
    assert code == 2 and "exists; choose a new name" in err
    code, _, err = _cli(capsys, "add-domain", "--ckpt", weights, "--name", "news", "--init-from", "legal",
                        "--out", str(tmp_path / "h.ckpt"))
    assert code == 2 and "known: code, en, zh" in err and not (tmp_path / "h.ckpt").exists()


def test_training_or_balancing_on_text_of_another_tokenizer_is_refused(trained_sigma, capsys, tmp_path):
    """Token ids mean other text under another tokenizer: resume, add-domain and eval refuse such data."""
    _, prepared, weights = trained_sigma
    retokenized = tmp_path / "retokenized"
    prepare_data([("en", str(_corpus_file(prepared, "en")))], str(retokenized), 16, vocab_size=400)
    code, _, err = _cli(capsys, "train", "--resume", weights, "--data", str(retokenized), "--steps", "61",
                        "--out", str(tmp_path / "run"))
    assert code == 2 and "the data's tokenizer differs from the checkpoint's" in err, err
    code, _, err = _cli(capsys, "train", "--resume", weights, "--set", "data.source=synthetic", "--steps", "61",
                        "--out", str(tmp_path / "run2"))
    assert code == 2 and "this run's data has none" in err, err
    code, _, err = _cli(capsys, "add-domain", "--ckpt", weights, "--name", "en2", "--init-from", "dense",
                        "--token-frequency", str(retokenized), "--out", str(tmp_path / "g.ckpt"))
    assert code == 2 and "prepared with another tokenizer" in err
    code, _, err = _cli(capsys, "eval", "perplexity", "--ckpt", weights, "--data", str(retokenized), "--split", "train")
    assert code == 2 and "--data" in err and "prepared with another tokenizer" in err, err
    code, _, err = _cli(capsys, "add-domain", "--ckpt", weights, "--name", "x" * 65, "--init-from", "dense",
                        "--out", str(tmp_path / "g.ckpt"))
    assert code == 2 and "1-64 letters" in err and len(err) < 400
    assert not (tmp_path / "g.ckpt").exists() and not (tmp_path / "g.json").exists()


def test_a_file_at_out_without_a_sidecar_is_never_overwritten(trained_sigma, capsys, tmp_path):
    """Another tool's checkpoint (or a killed write's weights) at --out: refused, the file untouched."""
    _, _, weights = trained_sigma
    (tmp_path / "g.ckpt").write_bytes(b"someone's PanGu-alpha checkpoint")
    code, _, err = _cli(capsys, "add-domain", "--ckpt", weights, "--name", "news", "--init-from", "dense",
                        "--out", str(tmp_path / "g.ckpt"))
    assert code == 2 and "exists (without a sidecar g.json)" in err, err
    assert (tmp_path / "g.ckpt").read_bytes() == b"someone's PanGu-alpha checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.ckpt"]
    code, _, err = _cli(capsys, "extract", "--ckpt", weights, "--domain", "en", "--out", str(tmp_path / "sub.ckpt"))
    assert code == 2 and "names a folder" in err and not (tmp_path / "sub.ckpt").exists()
    code, _, err = _cli(capsys, "add-domain", "--ckpt", weights, "--name", "news", "--init-from", "dense",
                        "--out", str(tmp_path / "step_00000300.ckpt"))
    assert code == 2 and "step_N names belong to a training run" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.ckpt"]




@pytest.mark.parametrize("dropped", ["routing_table", "experts.b2"])
def test_a_checkpoint_lacking_a_sparse_layers_table_or_expert_is_one_line(tmp_path, capsys, dropped):
    """extract, add-domain and generate index a sparse layer's tensors by name: one that is missing is named."""
    from mindformers_sigma.checkpoint.model import write_model
    from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM

    from conftest import micro_config

    config = micro_config()
    weights = {p.name: p.asnumpy() for p in PanGuSigmaForCausalLM(config).get_parameters()}
    name = next(n for n in weights if n.startswith("backbone.top_query_layer.") and n.endswith(dropped))
    checkpoint = tmp_path / "model.ckpt"
    write_model(str(checkpoint), {n: w for n, w in weights.items() if n != name}, config,
                [f"d{i}" for i in range(config.moe.num_domains)], None, "test")
    for command in (["extract", "--ckpt", str(checkpoint), "--domain", "d1", "--out", str(tmp_path / "sub")],
                    ["add-domain", "--ckpt", str(checkpoint), "--name", "new", "--init-from", "d0", "--out",
                     str(tmp_path / "grown.ckpt")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"lacks parameter {name}, of a sparse layer of its config" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt", "model.json"]  # nothing written
