"""Self-describing checkpoints: the sidecar carries the config, the domain names and the tokenizer."""

from __future__ import annotations

import json

import pytest

from mindformers_sigma.checkpoint.description import describe_checkpoint
from mindformers_sigma.config import config_to_dict
from mindformers_sigma.data.manifest import domains_and_tokenizer
from mindformers_sigma.errors import DataError
from mindformers_sigma.tokenizer.sentencepiece_bpe import Tokenizer
from mindformers_sigma.training.trainer import train

from conftest import REAL_VOCAB, micro_config

TEXT = "def bisect(a, x):\n    迈向新世纪  <eod> tabs\tand spaces"


@pytest.fixture(scope="module")
def trained(real_corpus, tmp_path_factory):
    _, prepared = real_corpus
    config = micro_config(model={"vocab_size": REAL_VOCAB}, data={"source": "mindrecord", "path": str(prepared)},
                          train={"batch_size": 4, "steps": 2, "warmup_steps": 1, "peak_flops": 1e11})
    out = tmp_path_factory.mktemp("described")
    summary = train(config, out_dir=str(out))
    return config, prepared, summary.checkpoint


def _rewrite_sidecar(weights, tmp_path, change, reseal=False):
    """A copy of the checkpoint whose sidecar ``change`` edits (the weights, which its sha256 covers, stay);
    ``reseal``: with a matching description sha256, as if the damage had happened before it was computed."""
    import shutil

    target = tmp_path / "old"
    target.mkdir(exist_ok=True)
    shutil.copy(weights, target)
    sidecar = weights.rsplit(".", 1)[0] + ".json"
    meta = json.loads(open(sidecar, encoding="utf-8").read())
    change(meta)
    meta.pop("description_sha256", None)  # as an older checkpoint, or a damaged one, the test says which
    if reseal:
        from mindformers_sigma.checkpoint.description import _digest

        meta["description_sha256"] = _digest(meta)
    (target / (sidecar.rsplit("/", 1)[1])).write_text(json.dumps(meta))
    return str(target / weights.rsplit("/", 1)[1])


def test_a_checkpoint_names_its_config_domains_and_tokenizer(trained):
    config, prepared, weights = trained
    for path in (weights, weights.rsplit(".", 1)[0] + ".json"):
        described = describe_checkpoint(path)
        assert config_to_dict(described.config) == config_to_dict(config)
        assert described.domains[:3] == ["code", "en", "zh"] and len(described.domains) == config.moe.num_domains
        assert described.domain_id("zh") == 2
        reference = Tokenizer.from_file(str(prepared / "tokenizer.model"))
        assert described.tokenizer.encode(TEXT) == reference.encode(TEXT)
        assert described.tokenizer.decode(reference.encode(TEXT)) == TEXT


def test_an_older_checkpoint_is_refused_until_config_and_data_supply_what_it_lacks(trained, tmp_path):
    config, prepared, weights = trained
    undescribed = _rewrite_sidecar(weights, tmp_path, lambda meta: [meta.pop("domains"), meta.pop("tokenizer")])
    with pytest.raises(DataError, match=r"records no domain names or tokenizer .* pass --data"):
        describe_checkpoint(undescribed)
    assert describe_checkpoint(undescribed, trained_on=lambda: domains_and_tokenizer(str(prepared))).domains[:3] == ["code", "en", "zh"]
    configless = _rewrite_sidecar(weights, tmp_path, lambda meta: [meta.pop(k) for k in ("config", "domains", "tokenizer")])
    with pytest.raises(DataError, match="records no config; pass --config"):
        describe_checkpoint(configless)
    config_file = tmp_path / "micro.yaml"
    config_file.write_text(json.dumps(config_to_dict(config)))  # JSON is YAML
    assert describe_checkpoint(configless, config_path=str(config_file),
                               trained_on=lambda: domains_and_tokenizer(str(prepared))).config.model.vocab_size == REAL_VOCAB
    with pytest.raises(DataError, match="records its own config, domains and tokenizer; drop --config"):
        describe_checkpoint(weights, config_path=str(config_file))
    unsealed = _rewrite_sidecar(weights, tmp_path, lambda meta: None)
    with pytest.raises(DataError, match="do not match their sha256"):
        describe_checkpoint(unsealed)  # a description without its sha256 is not trusted


@pytest.mark.parametrize("damage,words", [
    (lambda meta: meta["tokenizer"].update(model_base64="not base64!"), "tokenizer field is damaged"),
    (lambda meta: meta["tokenizer"].update(sha256="0" * 64), "does not match its sha256"),
    (lambda meta: meta.update(domains=["a"] * 99), "do not fit moe.num_domains"),
    (lambda meta: meta.update(domains=["a", "a", "b", "c"]), "do not fit moe.num_domains"),
    (lambda meta: meta.update(domains=["a"]), "do not fit moe.num_domains"),
    (lambda meta: meta["config"]["model"].update(hidden_size=-1), "recorded config is invalid"),
])
def test_a_damaged_description_is_one_line(trained, tmp_path, damage, words):
    _, _, weights = trained
    with pytest.raises(DataError, match=words) as caught:
        describe_checkpoint(_rewrite_sidecar(weights, tmp_path, damage, reseal=True))
    assert "\n" not in str(caught.value)


def test_a_description_changed_behind_its_sha256_is_refused(trained, tmp_path):
    import shutil

    _, _, weights = trained
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(weights, copy)
    sidecar = weights.rsplit(".", 1)[0] + ".json"
    meta = json.loads(open(sidecar, encoding="utf-8").read())
    meta["domains"][0] = "kode"
    (copy / sidecar.rsplit("/", 1)[1]).write_text(json.dumps(meta))
    with pytest.raises(DataError, match="do not match their sha256"):
        describe_checkpoint(str(copy / weights.rsplit("/", 1)[1]))


def test_bad_checkpoint_paths_and_unknown_domains_are_one_line(trained, tmp_path):
    _, _, weights = trained
    with pytest.raises(DataError, match="no such file"):
        describe_checkpoint(str(tmp_path / "model.txt"))
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(DataError, match="not a checkpoint"):
        describe_checkpoint(str(tmp_path / "model.txt"))
    (tmp_path / "step_00000001.ckpt").write_text("x")
    with pytest.raises(DataError, match="no sidecar"):
        describe_checkpoint(str(tmp_path / "step_00000001.ckpt"))
    corrupt = _rewrite_sidecar(weights, tmp_path, lambda meta: meta.update(sha256="f" * 64))
    with pytest.raises(DataError, match="sha256 does not match"):
        describe_checkpoint(corrupt)
    with pytest.raises(DataError, match=r"--domain 'fr': not a domain of .*; known: code, en, zh"):
        describe_checkpoint(weights).domain_id("fr")


def test_synthetic_data_has_no_tokenizer(tmp_path):
    config = micro_config(train={"batch_size": 4, "steps": 1, "warmup_steps": 1, "peak_flops": 1e11})
    summary = train(config, out_dir=str(tmp_path / "run"))
    described = describe_checkpoint(summary.checkpoint)
    assert described.tokenizer is None and described.domains == [f"domain{i}" for i in range(4)]
