"""The device layout: per-parameter layouts against the built model, op strategies, strategy files that
MindSpore's own utilities read and transform checkpoints with, and the planner's numbers."""

from __future__ import annotations

import json
import math
import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore.parallel import build_searched_strategy, rank_list_for_transform, transform_checkpoints

from mindformers_sigma.cli import main
from mindformers_sigma.config import ConfigError, apply_overrides, load_config
from mindformers_sigma.distributed.collectives import Sharding
from mindformers_sigma.distributed.topology import all_ranks
from mindformers_sigma.errors import DataError
from mindformers_sigma.model.pangu_sigma import PanGuSigmaForCausalLM, build_routing_tables
from mindformers_sigma.parallel.layouts import parameter_layouts
from mindformers_sigma.parallel.mesh import DeviceMesh
from mindformers_sigma.parallel.planner import check_fits, plan_layout
from mindformers_sigma.parallel.runtime import check_trainable, describe_layout
from mindformers_sigma.parallel.strategies import apply_layout, op_strategies
from mindformers_sigma.parallel.strategy_file import PRODUCER_FIELD, strategy_document, write_strategy_file
from mindformers_sigma.params import count_parameters
from mindformers_sigma.training.trainer import NOT_CHECKPOINTED, build_train_step, train

from conftest import CONFIGS, REAL_VOCAB, REPO, micro_config

COMMITTED = {"pangu_sigma_1085b_512p.yaml": CONFIGS / "strategy" / "pangu_sigma_1085b_512p.json"}
EIGHT_RANKS = {"mode": "hybrid_parallel", "device_num": 8, "data_parallel": 4, "model_parallel": 2,
               "expert_parallel": 2, "optimizer_shard": True, "vocab_parallel": True}


def _sharded(parallel, **sections):
    """A micro model laid out over several ranks (hybrid_parallel: the same layout on CPU and Ascend)."""
    return micro_config(parallel=parallel, **sections)


def _built_parameters(config):
    step = build_train_step(config, None)
    return {name: (tuple(p.shape), str(p.dtype).lower()) for name, p in step.parameters_dict().items()
            if name not in NOT_CHECKPOINTED}


@pytest.mark.parametrize("sections", [{}, {"ecss": {"enabled": True}}, {"moe": {"router": "switch"}},
                                      {"ecss": {"enabled": True, "slab_experts": 4}}])
def test_planned_parameters_are_the_built_models_and_sum_to_its_count(sections):
    config = micro_config(**sections)
    planned = {l.name: (l.shape, l.dtype) for l in parameter_layouts(config)}
    assert planned == _built_parameters(config)
    weights = sum(l.elements for l in parameter_layouts(config) if l.trainable and l.kind != "optimizer")
    if not config.ecss.enabled:
        assert weights == count_parameters(config).total


def test_the_tiny_configs_planned_parameters_are_its_built_models():
    config = load_config(CONFIGS / "pangu_sigma_tiny_cpu.yaml")
    assert {l.name: (l.shape, l.dtype) for l in parameter_layouts(config)} == _built_parameters(config)
    assert sum(l.elements for l in parameter_layouts(config)
               if l.trainable and l.kind != "optimizer") == count_parameters(config).total


@pytest.mark.parametrize("config_file", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shard_of_every_committed_config_divides_and_tiles_its_parameter(config_file):
    config = load_config(CONFIGS / config_file)
    mesh = DeviceMesh.of(config)
    for layout in parameter_layouts(config):
        assert math.prod(layout.dev_matrix) == mesh.stage_devices, layout.name
        pieces = math.prod(layout.splits) * (layout.opt_shard_size or 1)
        assert layout.shard_elements * pieces == layout.elements, layout.name
        for size, split, shard in zip(layout.shape, layout.splits, layout.shard_shape):
            assert size % split == 0 and shard * split <= size, layout.name


@pytest.mark.parametrize("config_file", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_committed_config_fits_its_devices_by_the_planner(config_file):
    check_fits(plan_layout(load_config(CONFIGS / config_file)))


def test_a_split_that_does_not_divide_names_the_parameter_and_the_dimension():
    with pytest.raises(ConfigError, match=r"model_parallel = 2: must divide model.ffn_hidden_size \(51\)"):
        _sharded(dict(EIGHT_RANKS), model={"ffn_hidden_size": 51})  # refused when the config is loaded
    config = _sharded(dict(EIGHT_RANKS))
    config.model.ffn_hidden_size = 51  # past the config's rules, the layouts still name what does not divide
    with pytest.raises(ConfigError, match=r"model_parallel = 2: does not divide dimension 1 \(51\) of "
                                          r"backbone.layers.0.ffn.mapping.weight \[32, 51\]"):
        parameter_layouts(config)
    # ecss.slab_experts counts slots per rank: no more than the experts a rank holds (8 / ep = 4)
    with pytest.raises(ConfigError, match=r"ecss.slab_experts = 5: \(slots per rank\) must be <= the 4 experts a "
                                          r"rank holds"):
        _sharded(dict(EIGHT_RANKS), ecss={"enabled": True, "slab_experts": 5})
    three = {l.name: l for l in parameter_layouts(_sharded(dict(EIGHT_RANKS), ecss={"enabled": True,
                                                                                      "slab_experts": 3}))}
    assert three["backbone.layers.1.ffn.experts.w1"].shard_shape == (3, 32, 24)  # 3 slots on each of 2 ep ranks
    # a rank holds 8 / ep = 4 of the experts: its step can activate at most those
    slabs = {l.shard_shape[0] for l in parameter_layouts(_sharded(dict(EIGHT_RANKS), ecss={"enabled": True}))
             if l.kind == "slab"}
    assert slabs == {4}
    # a pipeline stage holds the in-flight micro-batches of every data-parallel rank: 2 data-parallel ranks x
    # 2 micro-batches x 2 rows span all 4 domains, so every one of the 4 experts a rank holds; a smaller slab
    # would overflow
    pipelined = {**EIGHT_RANKS, "data_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 2}
    with pytest.raises(ConfigError, match=r"ecss.slab_experts = 2: is below the 4 experts per rank"):
        parameter_layouts(_sharded(pipelined, ecss={"enabled": True, "slab_experts": 2}))
    slabs = {l.shard_shape[0] for l in parameter_layouts(_sharded(pipelined, ecss={"enabled": True}))
             if l.kind == "slab"}
    assert slabs == {4}


@pytest.mark.parametrize("parallel,field,words", [
    ({**EIGHT_RANKS, "expert_parallel": 8}, "parallel.expert_parallel", "must divide parallel.data_parallel (4)"),
    ({**EIGHT_RANKS, "data_parallel": 1, "model_parallel": 8, "expert_parallel": 1}, "parallel.model_parallel",
     "must divide model.num_heads (4)"),
    ({**EIGHT_RANKS, "device_num": 16}, "parallel.device_num", "must equal data_parallel * model_parallel"),
    ({**EIGHT_RANKS, "data_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 1}, "parallel.micro_batch_num",
     ">= pipeline_stage"),
    ({**EIGHT_RANKS, "data_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 3}, "train.batch_size",
     "data_parallel * micro_batch_num * grad_accumulation_steps (6)"),
])
def test_layout_rules_are_checked_when_the_config_is_loaded(parallel, field, words):
    with pytest.raises(ConfigError) as caught:
        _sharded(parallel)
    assert field in str(caught.value) and words in str(caught.value)


def test_the_old_modes_are_refused_naming_the_valid_ones():
    for old in ("data_parallel", "semi_auto_parallel"):
        with pytest.raises(ConfigError, match=rf"parallel.mode = '{old}': must be one of 'stand_alone', "
                                              r"'hybrid_parallel'"):
            micro_config(parallel={"mode": old, "device_num": 2, "data_parallel": 2})


def test_check_trainable_refuses_only_what_is_not_built_and_the_start_line_says_how_it_runs():
    # Model, expert and vocabulary parallelism, the optimizer shard, dropout and ECSS all train, on CPU too.
    check_trainable(micro_config(parallel=dict(EIGHT_RANKS)))
    check_trainable(_sharded(dict(EIGHT_RANKS), model={"dropout_rate": 0.1}, ecss={"enabled": True}))
    check_trainable(_sharded({"mode": "hybrid_parallel", "device_num": 8, "data_parallel": 8}, model={"dropout_rate": 0.1},
                             ecss={"enabled": True}))
    check_trainable(micro_config(model={"dropout_rate": 0.1}, ecss={"enabled": True}))  # stand-alone
    refusals = [
        ({**EIGHT_RANKS, "data_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 2}, {},
         r"parallel.pipeline_stage = 2: > 1 is planned, but the pipelined train step .* is not built"),
        ({**EIGHT_RANKS, "data_parallel": 4, "model_parallel": 1, "device_num": 8, "pipeline_stage": 2,
          "micro_batch_num": 2}, {"ecss": {"enabled": True}}, r"parallel.pipeline_stage = 2: .*not built"),
    ]
    for parallel, sections, words in refusals:
        config = _sharded(parallel, **sections)  # each loads: planned, just not trained
        with pytest.raises(ConfigError, match=words):
            check_trainable(config)

    assert describe_layout(micro_config(), 1) == "layout: stand-alone, one process holding the whole model"
    assert describe_layout(micro_config(parallel=dict(EIGHT_RANKS)), 8) == (
        "layout: hybrid_parallel over 8 workers: data 4 x model 2, experts over 2, vocabulary-parallel embedding, "
        "optimizer shard; explicit collectives (docs/parallel.md)")
    data_only = micro_config(parallel={"mode": "hybrid_parallel", "device_num": 2, "data_parallel": 2,
                                       "vocab_parallel": True, "recompute": True})
    assert describe_layout(data_only, 2) == (  # vocab_parallel splits nothing with model_parallel 1
        "layout: hybrid_parallel over 2 workers: data 2 x model 1, experts over 1, recompute; explicit collectives "
        "(docs/parallel.md)")


def _primitive_of(network, key: str):
    """The primitive an op-strategy key names: ``"cell.path/attribute"``."""
    path, attribute = key.rsplit("/", 1) if "/" in key else ("", key)
    cell = network
    for part in filter(None, path.split(".")):
        cell = getattr(cell, part) if not part.isdigit() else cell[int(part)]
    return getattr(cell, attribute)


def _weight_of(key: str, layouts) -> tuple:
    """(operand index, parameter layout) of the weight an op-strategy key multiplies or gathers, or None."""
    path, attribute = key.rsplit("/", 1) if "/" in key else ("", key)
    if attribute == "matmul":
        return 1, layouts[f"{path}.weight"]
    if attribute in ("up", "down"):
        return 1, layouts[f"{path}.{'w1' if attribute == 'up' else 'w2'}"]
    if key.endswith("word/gather") or key == "head":
        return (0 if key.endswith("gather") else 1), layouts["backbone.embedding.word.embedding_table"]
    return None


def test_op_strategies_describe_how_each_ranks_model_splits_itself_and_agree_with_the_parameter_layouts():
    config = _sharded(dict(EIGHT_RANKS))
    strategies = op_strategies(config)
    layouts = {l.name: l for l in parameter_layouts(config)}
    weighted = {key: _weight_of(key, layouts) for key in strategies}
    assert sum(w is not None for w in weighted.values()) > 15
    for key, found in weighted.items():
        if found is not None:  # the weight operand's strategy is the weight's split
            operand, layout = found
            assert strategies[key].in_strategy[operand] == layout.splits, key
    for topology in all_ranks(4, 2, 2):
        network = PanGuSigmaForCausalLM(config, build_routing_tables(config), None, Sharding(topology, True))
        apply_layout(config, network)
        built = {name: tuple(p.shape) for name, p in network.parameters_and_names()}
        # each rank builds its own slices: the layout's shard of every weight (moments are the optimizer's)
        assert built == {name: l.shard_shape for name, l in layouts.items()  # (less the step state)
                         if l.kind != "optimizer" and name.startswith("backbone.")}, topology.rank
        # every MatMul/BatchMatMul/Gather of the model has a strategy; none is set on the primitive, since
        # under hybrid_parallel the layers split themselves and MindSpore must not split them again
        sharded = {f"{path}/{name}" if path else name for path, cell in network.cells_and_names()
                   for name, value in vars(cell).get("_primitives", {}).items()
                   if type(value).__name__ in ("MatMul", "BatchMatMul", "Gather")}
        assert len(sharded) > 20 and sharded <= set(strategies)
        for key, op in strategies.items():
            primitive = _primitive_of(network, key)
            assert getattr(primitive, "in_strategy", None) is None and "in_strategy" not in primitive.attrs, key
            if weighted[key] is not None:
                operand, layout = weighted[key]
                local = tuple(size // split for size, split in zip(layout.shape, op.in_strategy[operand]))
                assert built[layout.name] == local, (topology.rank, key)


def test_op_strategies_put_each_op_on_the_stage_of_its_parameters():
    config = _sharded({**EIGHT_RANKS, "data_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 2})
    strategies = op_strategies(config)
    layouts = {l.name: l for l in parameter_layouts(config)}
    for key, op in strategies.items():
        path = key.rsplit("/", 1)[0] if "/" in key else ""
        assert op.stage in layouts[next(n for n in layouts if n.startswith(path))].stages or not path, key
    layer_stages = {key.split(".")[2]: op.stage for key, op in strategies.items() if key.startswith("backbone.layers.")}
    assert layer_stages == {"0": 0, "1": 0}  # 3 layers over 2 stages: the first takes one more
    assert {op.stage for key, op in strategies.items() if key.startswith("backbone.top_query_layer")} == {1}
    assert strategies["head"].stage == 1 and strategies["backbone.embedding.word/gather"].stage == 0


def _split_rule(name: str):
    """Which mesh axis splits each dimension, from the parameter's role (the docs' rules, restated here)."""
    leaf = name.split(".", 1)[1] if name.startswith("adam_") else name
    if ".experts." in leaf:
        return {"w1": ("ep", None, "mp"), "b1": ("ep", None, "mp"), "w2": ("ep", "mp", None),
                "b2": ("ep", None, None)}[leaf.rsplit(".", 1)[1]]
    if leaf.count(".") < 2:
        return None  # global_step, loss_scale, ...
    role, kind = leaf.rsplit(".", 2)[-2:]
    if role in ("query", "key", "value", "mapping"):
        return (None, "mp") if kind == "weight" else ("mp",)
    if role in ("output", "projection"):
        return ("mp", None) if kind == "weight" else None
    if leaf == "backbone.embedding.word.embedding_table":
        return ("mp", None)  # vocab_parallel
    return None  # replicated


def _rank_slice(name: str, trainable: bool, rank: int, full: np.ndarray, dp=4, mp=2, ep=2) -> np.ndarray:
    """The slice of ``full`` rank ``rank`` holds by the mesh numbering (model parallel fastest; an expert's ep
    owners mp ranks apart); an AdamW moment is further cut on dimension 0 by the optimizer shard over the
    data axis: the ``dp`` ranks holding the same slice of a dense parameter, the ``dp / ep`` holding the same
    experts' slice, where that many divide the slice's dimension 0 (an expert tensor whole over the model
    axis, ``b2``, is held by ranks along two axes: under model parallel its moments stay whole).  Weights stay
    whole slices."""
    data, model = divmod(rank, mp)
    coordinate = {"mp": (model, mp), "ep": (data % ep, ep)}
    rule = _split_rule(name)
    piece = full
    for dim, axis in enumerate(rule or ()):
        if axis:
            at, parts = coordinate[axis]
            size = piece.shape[dim] // parts
            piece = np.take(piece, range(at * size, (at + 1) * size), axis=dim)
    if not trainable or full.ndim == 0 or not name.startswith(("adam_m.", "adam_v.")):
        return piece
    if ".experts." in name and "mp" not in rule and mp > 1:
        return piece
    replica, replicas = (data // ep, dp // ep) if ".experts." in name else (data, dp)
    if replicas > 1 and piece.shape[0] % replicas == 0:
        size = piece.shape[0] // replicas
        piece = piece[replica * size:(replica + 1) * size]
    return piece


@pytest.mark.slow
def test_transform_checkpoints_splits_a_trained_checkpoint_over_8_ranks_and_merges_it_back_bit_exactly(
        real_corpus, tmp_path):
    _, prepared = real_corpus
    sections = dict(model={"vocab_size": REAL_VOCAB}, data={"source": "mindrecord", "path": str(prepared)},
                    train={"batch_size": 8, "warmup_steps": 1, "steps": 12, "learning_rate": 3e-3, "peak_flops": 1e11,
                           "log_interval": 4})
    trained = train(micro_config(**sections), out_dir=str(tmp_path / "run"))
    assert trained.final_loss < trained.first_loss  # real training, not an initialisation
    source = tmp_path / "single" / "rank_0"
    source.mkdir(parents=True)
    shutil.copy(trained.checkpoint, source / "trained.ckpt")
    original = {name: value.asnumpy() for name, value in ms.load_checkpoint(str(source / "trained.ckpt")).items()}

    config = _sharded(dict(EIGHT_RANKS), **sections)
    strategy = str(tmp_path / "tiny_8p.json")
    write_strategy_file(config, "tiny_8p", strategy)
    layouts = {l.name: l for l in parameter_layouts(config)}
    assert set(build_searched_strategy(strategy)) == set(layouts) <= set(original)
    assert rank_list_for_transform(5, None, strategy) == [0]
    assert sorted(rank_list_for_transform(0, strategy, None)) == list(range(8))

    transform_checkpoints(str(tmp_path / "single"), str(tmp_path / "split"), "part", None, strategy)
    planned = plan_layout(config).stages[0].bytes
    planned_state = sum(planned[k] for k in ("dense weights (fp32)", "dense AdamW moments (fp32)", "expert weights (fp32)",
                                             "expert AdamW moments (fp32)", "routing tables (int32)"))
    for rank in range(8):
        shard = ms.load_checkpoint(str(tmp_path / "split" / f"rank_{rank}" / f"part{rank}.ckpt"))
        # the planner's per-device state is the bytes MindSpore's split gives each rank
        assert planned_state == sum(shard[name].nbytes for name, layout in layouts.items()
                                    if layout.trainable or name.endswith("routing_table"))
        for name, layout in layouts.items():
            expected = _rank_slice(name, layout.trainable, rank, original[name])
            assert tuple(shard[name].shape) == layout.shard_shape, (rank, name)
            np.testing.assert_array_equal(shard[name].asnumpy(), expected, err_msg=f"rank {rank} {name}")
    # the optimizer shard was exercised, on moments only: dense ones over dp, expert ones over dp / ep
    assert {l.opt_shard_size for l in layouts.values() if l.kind != "optimizer"} == {0}
    assert 2 in {l.opt_shard_size for n, l in layouts.items() if l.kind == "optimizer" and ".experts." in n}
    assert 4 in {l.opt_shard_size for n, l in layouts.items() if l.kind == "optimizer" and ".experts." not in n}

    transform_checkpoints(str(tmp_path / "split"), str(tmp_path / "merged"), "whole", strategy, None)
    merged = ms.load_checkpoint(str(tmp_path / "merged" / "rank_0" / "whole0.ckpt"))
    assert set(merged) == set(original)
    for name, value in original.items():
        assert merged[name].asnumpy().dtype == value.dtype
        np.testing.assert_array_equal(merged[name].asnumpy(), value, err_msg=name)


@pytest.mark.parametrize("config_file", sorted(COMMITTED))
def test_the_committed_strategy_file_is_what_the_config_generates_and_mindspore_reads_it(config_file, tmp_path):
    config = load_config(CONFIGS / config_file)
    committed = COMMITTED[config_file]
    regenerated = tmp_path / committed.name
    write_strategy_file(config, f"ascend_configs/{config_file}", str(regenerated))
    assert regenerated.read_text() == committed.read_text(), (
        f"{committed} drifted from {config_file}: run pangu-sigma plan --config ascend_configs/{config_file} "
        f"--emit-strategy ascend_configs/strategy")
    producer = json.loads(committed.read_text())[PRODUCER_FIELD]
    assert producer["config"] == f"ascend_configs/{config_file}" and producer["devices"] == 512
    strategy = build_searched_strategy(str(committed))
    expected = {l.name for l in parameter_layouts(config)}
    assert {name.split("-", 1)[-1] for name in strategy} == expected
    assert rank_list_for_transform(300, None, str(committed)) == [0]


def test_pipeline_stages_make_a_merged_strategy_file_mindspore_reads_stage_by_stage(tmp_path):
    config = _sharded({**EIGHT_RANKS, "data_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 2})
    document = strategy_document(config, "tiny")
    keys = document["parallel_layout_item"]
    assert "0-backbone.embedding.word.embedding_table" in keys and "1-backbone.embedding.word.embedding_table" in keys
    assert "1-backbone.top_query_layer.ffn.experts.w1" in keys and "0-backbone.top_query_layer.ffn.experts.w1" not in keys
    assert all(math.prod(item["dev_matrix"]) == 4 for item in keys.values())  # one stage's devices
    path = tmp_path / "pp2.json"
    write_strategy_file(config, "tiny", str(path))
    assert len(build_searched_strategy(str(path))) == len(keys)
    assert rank_list_for_transform(6, None, str(path)) == [0]


def test_plan_json_reports_the_512_card_layout_fits_only_with_ecss(capsys):
    assert main(["plan", "--config", str(CONFIGS / "pangu_sigma_1085b_512p.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("devices", "per_device_bytes", "per_device_bytes_without_ecss", "hbm_budget_bytes", "fits",
                "host_bytes_per_server", "tokens_per_s_estimate", "communication_bytes_per_step", "assumptions"):
        assert key in report, key
    assert report["devices"] == 512 and report["fits"]
    assert report["hbm_budget_bytes"] == 32 * 2 ** 30
    assert report["per_device_bytes"] <= report["hbm_budget_bytes"] < report["per_device_bytes_without_ecss"]
    assert report["per_device_bytes"] == max(stage["total_bytes"] for stage in report["stages"])
    assert all("source" in a and "value" in a for a in report["assumptions"].values())
    # the AllReduces the code makes, per kind of group (parallel/collective_volume.py), and ECSS's transfers
    assert set(report["communication_bytes_per_step"]) == {
        "model_allreduce", "expert_allreduce", "expert_model_allreduce", "data_allreduce", "world_allreduce",
        "ecss_host_to_device", "ecss_device_to_host"}


def test_plan_memory_is_the_parameter_bytes_of_the_built_model():
    # Stand-alone with no optimizer shard, weights and moments per device are the whole model's,
    # which a built train step holds as Parameters: the two are computed independently.
    config = micro_config()
    stage = plan_layout(config).stages[0]
    step = build_train_step(config, None)
    params = {n: p for n, p in step.parameters_dict().items() if n not in NOT_CHECKPOINTED}  # the LR schedule
    trainable = sum(p.nbytes for n, p in params.items() if p.requires_grad and not n.startswith(("adam_", "global")))
    moments = sum(p.nbytes for n, p in params.items() if n.startswith("adam_"))
    planned = {k: v for k, v in stage.bytes.items()}
    assert planned["dense weights (fp32)"] + planned["expert weights (fp32)"] == trainable
    assert planned["dense gradients (fp32)"] + planned["expert gradients (fp32)"] == trainable
    assert planned["dense AdamW moments (fp32)"] + planned["expert AdamW moments (fp32)"] == moments


def test_a_layout_that_overflows_is_one_line_naming_the_biggest_consumer(capsys):
    code = main(["plan", "--config", str(CONFIGS / "pangu_sigma_1085b_512p.yaml"), "--set", "ecss.enabled=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "does not fit" in err[0] and "over by" in err[0] and "expert AdamW moments" in err[0]
    plan = plan_layout(apply_overrides(load_config(CONFIGS / "pangu_sigma_1085b_512p.yaml"), ["ecss.enabled=false"]),
                       hbm_gb=1000)
    check_fits(plan)  # the same layout with enough memory fits
    with pytest.raises(DataError, match="host store does not fit"):
        check_fits(plan_layout(load_config(CONFIGS / "pangu_sigma_1085b_512p.yaml"), host_gb=100))


def test_plan_emits_a_strategy_file_and_refuses_bad_arguments(tmp_path, capsys):
    out = tmp_path / "strategies"
    assert main(["plan", "--config", str(CONFIGS / "pangu_sigma_tiny_cpu.yaml"), "--emit-strategy", str(out)]) == 0
    assert "per device" in capsys.readouterr().out
    assert build_searched_strategy(str(out / "pangu_sigma_tiny_cpu.json"))
    assert [p.name for p in out.iterdir()] == ["pangu_sigma_tiny_cpu.json"]  # no temporary left behind
    for bad in ("-3", "0", "nan", "1e300"):
        with pytest.raises(SystemExit) as caught:
            main(["plan", "--config", str(CONFIGS / "pangu_sigma_tiny_cpu.yaml"), "--hbm-gb", bad])
        assert caught.value.code == 2
    capsys.readouterr()
    big = str(CONFIGS / "pangu_sigma_1085b_512p.yaml")
    for args, words in ((["--config", str(tmp_path / "missing.yaml")], "file not found"),
                        (["--config", str(tmp_path)], "is a folder"),
                        (["--config", "/dev/zero"], "not a regular file"),
                        (["--config", big, "--emit-strategy", ""], "give a folder"),
                        (["--config", big, "--emit-strategy", str(out / "pangu_sigma_tiny_cpu.json")], "not a folder"),
                        (["--config", big, "--emit-strategy", str(tmp_path / "a" / "b")], "does not exist"),
                        (["--config", big, "--set", "ecss.enabled=false", "--emit-strategy", str(tmp_path / "no")],
                         "does not fit")):
        assert main(["plan", *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (args, err)
    assert not (tmp_path / "no").exists() and not (tmp_path / "a").exists()  # nothing written for a refusal


def test_the_launcher_refuses_a_planned_only_layout_before_starting_a_rank(tmp_path):
    from mindformers_sigma.launcher.checks import check_layout, check_train_args

    from launcher_helpers import micro_yaml

    eight = dict(mode="hybrid_parallel", device_num=8, data_parallel=4, model_parallel=2)
    with pytest.raises(DataError, match=r"parallel.device_num = 8 but the rank table lists 4"):
        check_layout(check_train_args(str(micro_yaml(tmp_path, **eight)), []), 4, "the rank table lists")
    pipelined = micro_yaml(tmp_path, name="pp.yaml", **{**eight, "data_parallel": 2, "pipeline_stage": 2,
                                                         "micro_batch_num": 2})
    with pytest.raises(ConfigError, match="parallel.pipeline_stage = 2: .*pipelined train step.*not built"):
        check_layout(check_train_args(str(pipelined), []), 8, "the rank table lists")
    sharded = micro_yaml(tmp_path, name="sharded.yaml", dropout=0.1, expert_parallel=2, optimizer_shard=True,
                         vocab_parallel=True, **eight)
    check_layout(check_train_args(str(sharded), []), 8, "the rank table lists")  # model and expert parallel train
    plain = micro_yaml(tmp_path, name="dp.yaml", dropout=0.1, mode="hybrid_parallel", device_num=8, data_parallel=8)
    check_layout(check_train_args(str(plain), []), 8, "the rank table lists")


def test_the_docs_show_what_plan_prints_for_the_512_card_config():
    from mindformers_sigma.parallel.report import format_plan

    report = format_plan(plan_layout(load_config(CONFIGS / "pangu_sigma_1085b_512p.yaml")))
    shown = (REPO / "docs" / "parallel.md").read_text().split(
        "$ pangu-sigma plan --config ascend_configs/pangu_sigma_1085b_512p.yaml\n", 1)[1].split("```", 1)[0]
    assert shown.strip() and shown.strip() in report, "docs/parallel.md's plan output drifted; paste the new one"
