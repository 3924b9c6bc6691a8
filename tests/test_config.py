"""Config validation: every rule, triggered by a bad YAML file, gives a clear one-line error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from mindformers_sigma.config import ConfigError, load_config

from conftest import CONFIGS, REPO, tiny_raw


def _write(tmp_path, raw, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("config_file", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(config_file):
    config = load_config(CONFIGS / config_file)
    assert config.model.dense_layers + config.model.sparse_layers == config.model.num_layers


RULES = [
    # (section, changes, field named in the error, words of the rule)
    ("model", {"hidden_size": 130}, "model.hidden_size", "divisible by model.num_heads"),
    ("moe", {"num_experts": 9}, "moe.num_experts", "num_domains * experts_per_domain"),
    ("model", {"dense_layers": 3}, "model.num_layers", "dense_layers + sparse_layers"),
    ("model", {"num_layers": 10 ** 9, "dense_layers": 10 ** 9 - 2}, "model.num_layers", "must be <= 1,000"),
    ("parallel", {"device_num": 4, "data_parallel": 2}, "parallel.device_num",
     "data_parallel * model_parallel * pipeline_stage"),
    ("parallel", {"expert_parallel": 3, "device_num": 3, "data_parallel": 3, "mode": "hybrid_parallel"},
     "parallel.expert_parallel", "must divide moe.num_experts"),
    # the modes before hybrid_parallel are gone: one line listing the valid choices
    ("parallel", {"mode": "semi_auto_parallel"}, "parallel.mode", "must be one of 'stand_alone', 'hybrid_parallel'"),
    ("parallel", {"device_num": 2, "data_parallel": 2, "mode": "data_parallel"}, "parallel.mode",
     "must be one of 'stand_alone', 'hybrid_parallel'"),
    ("parallel", {"expert_parallel": 2, "device_num": 2, "model_parallel": 2, "mode": "hybrid_parallel"},
     "parallel.expert_parallel", "must divide parallel.data_parallel (1): experts are split over the data-parallel"),
    ("parallel", {"model_parallel": 8, "device_num": 8, "mode": "hybrid_parallel"}, "parallel.model_parallel",
     "must divide model.num_heads (4): attention is split by heads"),
    ("parallel", {"device_num": 2, "data_parallel": 2}, "parallel.device_num",
     "must be 1 for parallel.mode stand_alone; use hybrid_parallel"),
    ("train", {"batch_size": 6, "grad_accumulation_steps": 4}, "train.batch_size", "must be divisible by"),
    ("train", {"loss_scale": "static"}, "train.loss_scale", "must be one of"),
    ("parallel", {"pipeline_stage": 2, "device_num": 2, "micro_batch_num": 1}, "parallel.micro_batch_num",
     ">= pipeline_stage"),
    ("model", {"eod_token_id": 99999}, "model.eod_token_id", "token id"),
    ("moe", {"router": "hash"}, "moe.router", "must be one of"),
    ("model", {"hidden_size": "big"}, "model.hidden_size", "must be an integer"),
    ("model", {"hidden_size": True}, "model.hidden_size", "must be an integer"),
    ("train", {"learning_rate": -1.0}, "train.learning_rate", "must be > 0"),
    ("moe", {"capacity_factor": 0}, "moe.capacity_factor", "must be > 0"),
    ("train", {"learning_rate": float("inf")}, "train.learning_rate", "must be a finite number"),
    ("train", {"grad_clip_norm": float("nan")}, "train.grad_clip_norm", "must be a finite number"),
    ("moe", {"capacity_factor": float("inf")}, "moe.capacity_factor", "must be a finite number"),
    ("model", {"init_std": float("-inf")}, "model.init_std", "must be a finite number"),
    ("data", {"seed": -1}, "data.seed", "must be in [0, 2147483647]"),
    ("moe", {"routing_seed": 2 ** 40}, "moe.routing_seed", "must be in [0, 2147483647]"),
    ("context", {"seed": -5}, "context.seed", "must be in [0, 2147483647]"),
    ("train", {"steps": 10 ** 12}, "train.steps", "one value per step"),
]


@pytest.mark.parametrize("section,changes,field,rule", RULES)
def test_rule_violation_names_file_field_value_and_rule(tmp_path, section, changes, field, rule):
    raw = tiny_raw()
    raw[section].update(changes)
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {field} = ")
    assert rule in message
    assert "\n" not in message


SPLIT_RULES = [
    # (sections changed, field named in the error, words of the rule): model_parallel splits more than the heads
    ({"model": {"ffn_hidden_size": 510}, "parallel": {"model_parallel": 4, "device_num": 4, "mode": "hybrid_parallel"}},
     "parallel.model_parallel", "must divide model.ffn_hidden_size (510): the FFN and the experts are split by their "
                                "hidden features"),
    ({"model": {"vocab_size": 4094}, "parallel": {"model_parallel": 4, "device_num": 4, "mode": "hybrid_parallel",
                                                  "vocab_parallel": True}},
     "parallel.model_parallel", "must divide model.vocab_size (4094) with parallel.vocab_parallel: the word table is "
                                "split by rows"),
]


@pytest.mark.parametrize("sections,field,rule", SPLIT_RULES)
def test_model_parallel_must_divide_every_dimension_it_splits(tmp_path, sections, field, rule):
    raw = tiny_raw()
    for section, changes in sections.items():
        raw[section].update(changes)
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {field} = ") and rule in message and "\n" not in message
    # the same vocabulary without vocab_parallel is replicated, so any size loads; a divisible FFN loads
    raw["parallel"]["vocab_parallel"] = False
    raw["model"]["ffn_hidden_size"] = 512
    load_config(_write(tmp_path, raw, "fixed.yaml"))


def test_unknown_key_suggests_the_closest(tmp_path):
    raw = tiny_raw()
    raw["model"]["hiden_size"] = raw["model"].pop("hidden_size")
    with pytest.raises(ConfigError, match=r"model\.hiden_size .*unknown key; did you mean 'hidden_size'\?"):
        load_config(_write(tmp_path, raw))


def test_unknown_section_suggests_the_closest(tmp_path):
    raw = tiny_raw()
    raw["paralel"] = raw.pop("parallel")
    with pytest.raises(ConfigError, match=r"unknown section; did you mean 'parallel'\?"):
        load_config(_write(tmp_path, raw))


def test_missing_file_and_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(broken)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


def test_hostile_yaml_is_a_short_config_error(tmp_path):
    """An anchor bomb in a value, nesting deeper than the parser recurses, a 5,000-digit integer, an
    empty file: each one short ConfigError, never an expanded value or an internal error."""
    value = "&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"
    for level in range(1, 9):  # each level: its own anchor, then 8 aliases of the level below
        value = f"&a{level} [{value}, " + ", ".join([f"*a{level - 1}"] * 8) + "]"
    bomb = tmp_path / "bomb.yaml"  # 9 ** 9 leaves when expanded, about 700 bytes of YAML
    bomb.write_text(yaml.safe_dump(tiny_raw()).replace("vocab_size: ", f"vocab_size: {value} #", 1))
    with pytest.raises(ConfigError) as caught:
        load_config(bomb)
    assert "model.vocab_size = [[" in str(caught.value) and len(str(caught.value)) < 400, str(caught.value)[:400]
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: " + "[" * 5_000 + "]" * 5_000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(deep)
    digits = tmp_path / "digits.yaml"
    digits.write_text(yaml.safe_dump(tiny_raw()).replace("vocab_size: ", "vocab_size: 1" + "0" * 5000 + " #", 1))
    with pytest.raises(ConfigError, match="invalid YAML value"):
        load_config(digits)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="the config is empty"):
        load_config(empty)


def test_cli_reports_bad_config_in_one_line_without_traceback(tmp_path):
    raw = tiny_raw()
    raw["model"]["hidden_size"] = 130
    path = _write(tmp_path, raw)
    result = subprocess.run([sys.executable, "-m", "mindformers_sigma", "params", "--config", str(path)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.hidden_size = 130" in lines[0] and str(path) in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_rejects_bad_argument_in_one_line():
    result = subprocess.run([sys.executable, "-m", "mindformers_sigma", "train", "--config", "x.yaml",
                             "--steps", "-3"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--steps" in result.stderr


@pytest.mark.parametrize("text,line", [
    ("model:\n  vocab_size: 10\n  vocab_size: 20\n", 3),
    ("train:\n  steps: 5\nmodel:\n  vocab_size: 10\ntrain:\n  steps: 6\n", 5),
])
def test_duplicate_yaml_keys_are_refused_not_silently_overridden(tmp_path, text, line):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: line {line} = ") and "given twice" in str(info.value)


def test_set_override_with_non_finite_value_is_refused():
    from mindformers_sigma.config import apply_overrides

    with pytest.raises(ConfigError, match="train.eps = nan: must be a finite number"):
        apply_overrides(load_config(CONFIGS / "pangu_sigma_tiny_cpu.yaml"), ["train.eps=.nan"])
