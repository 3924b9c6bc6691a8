"""Import and export of the official MindSpore PanGu-α releases, and PanGu-α's tokenizer.

Each release is built here as its own code lays it out: its tensor names, its orientations (``nn.Dense``
[out, in], ``Mapping`` [in, out]), its table placement, written with MindSpore's ``save_checkpoint``.  The
expected logits come from a float64 numpy forward written from the official model code
(``pcl_pangu/model/panguAlpha_mindspore/src/pangu_alpha.py``: pre-LN blocks, final LayerNorm, then the top
query layer whose query is the position's top-query embedding; ``nn.GELU``'s tanh form; eps 1e-5;
additive -10000 mask), reading the official tensors by their official names, not through the importer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest

from mindformers_sigma.cli import main
from mindformers_sigma.checkpoint.description import describe_checkpoint
from mindformers_sigma.checkpoint.model import load_model, model_weights

VOCAB, HIDDEN, HEADS, FFN, LAYERS, SEQ = 40000, 32, 4, 128, 3, 16
# each release's three tables (word, position, top query), spelled as its code names them
TABLES = {
    "pcl": ("embedding_table", "backbone.embedding.embedding.position_embedding.embedding_table",
            "backbone.top_query_embedding_table"),
    "mindformers": ("backbone.embedding.word_embedding.embedding_table",
                    "backbone.embedding.position_embedding.embedding_table",
                    "backbone.top_query_embedding.embedding_table"),
    "pangu1": ("backbone.word_embedding.embedding_table", "backbone.position_embedding.embedding_table",
               "backbone.top_query_embedding.embedding_table"),
}


def _official_block_prefixes():
    return [f"backbone.blocks.{i}" for i in range(LAYERS - 1)] + ["backbone.top_query_layer"]


def make_release(naming: str, seed: int = 0) -> dict:
    """A tiny PanGu-α with non-trivial weights, LayerNorms and biases, in ``naming``'s names and orientations."""
    rng = np.random.default_rng(seed)
    word, position, top_query = TABLES[naming]
    tensors = {word: rng.normal(0, 0.5, (VOCAB, HIDDEN)), position: rng.normal(0, 0.5, (SEQ, HIDDEN)),
               top_query: rng.normal(0, 0.5, (SEQ, HIDDEN)),
               "backbone.layernorm.gamma": 1 + rng.normal(0, 0.2, HIDDEN),
               "backbone.layernorm.beta": rng.normal(0, 0.2, HIDDEN)}
    for prefix in _official_block_prefixes():
        for norm in ("layernorm1", "layernorm2"):
            tensors[f"{prefix}.{norm}.gamma"] = 1 + rng.normal(0, 0.2, HIDDEN)
            tensors[f"{prefix}.{norm}.beta"] = rng.normal(0, 0.2, HIDDEN)
        for dense in ("dense1", "dense2", "dense3"):  # nn.Dense: [out, in]
            tensors[f"{prefix}.attention.{dense}.weight"] = rng.normal(0, 0.3, (HIDDEN, HIDDEN))
            tensors[f"{prefix}.attention.{dense}.bias"] = rng.normal(0, 0.2, HIDDEN)
        # Mapping / MappingOutput: [in, out]
        tensors[f"{prefix}.attention.projection.weight"] = rng.normal(0, 0.3, (HIDDEN, HIDDEN))
        tensors[f"{prefix}.attention.projection.bias"] = rng.normal(0, 0.2, HIDDEN)
        tensors[f"{prefix}.output.mapping.weight"] = rng.normal(0, 0.3, (HIDDEN, FFN))
        tensors[f"{prefix}.output.mapping.bias"] = rng.normal(0, 0.2, FFN)
        tensors[f"{prefix}.output.projection.weight"] = rng.normal(0, 0.15, (FFN, HIDDEN))
        tensors[f"{prefix}.output.projection.bias"] = rng.normal(0, 0.2, HIDDEN)
    return {name: value.astype(np.float32) for name, value in tensors.items()}


def save_release(tensors: dict, path, dtype=ms.float32) -> str:
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v, dtype)} for n, v in tensors.items()], str(path))
    return str(path)


def _layer_norm(x, gamma, beta):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + 1e-5) * gamma + beta


def _gelu(x):  # nn.GELU / P.GeLU: the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def official_eod_reset(ids: np.ndarray, eod: int):
    """(position ids, attention mask [B, S, S]) as the official dataset's ``get_input_data_batch_slice_map``
    makes them with ``eod_reset``: positions restart after each EOD, and a token sees its own document's
    earlier tokens only."""
    batch, seq = ids.shape
    positions = np.tile(np.arange(seq), (batch, 1))
    mask = np.tile(np.tril(np.ones((seq, seq))), (batch, 1, 1))
    for row in range(batch):
        previous = 0
        for index in np.flatnonzero(ids[row] == eod):
            mask[row, index + 1:, :index + 1] = 0
            positions[row, index + 1:] -= index + 1 - previous
            previous = index + 1
    return positions, mask


def official_logits(tensors: dict, naming: str, ids: np.ndarray, dtype=np.float64, eod=None) -> np.ndarray:
    """float64 logits [B, S, V] of the official computation (inference: no dropout); a causal mask, or with
    ``eod`` the official EOD reset of positions and attention."""
    t = {name: value.astype(dtype) for name, value in tensors.items()}
    word, position, top_query = (t[name] for name in TABLES[naming])
    batch, seq = ids.shape
    head_dim = HIDDEN // HEADS
    if eod is None:
        positions, mask = np.tile(np.arange(seq), (batch, 1)), np.tril(np.ones((seq, seq)))[None]
    else:
        positions, mask = official_eod_reset(ids, eod)
    adder = ((1.0 - mask[:, None]) * -10000.0).astype(dtype)

    def heads(x):
        return x.reshape(batch, seq, HEADS, head_dim).transpose(0, 2, 1, 3)

    def block(prefix, x, query_source=None):
        normed = _layer_norm(x, t[f"{prefix}.layernorm1.gamma"], t[f"{prefix}.layernorm1.beta"])
        dense = {d: (t[f"{prefix}.attention.{d}.weight"], t[f"{prefix}.attention.{d}.bias"])
                 for d in ("dense1", "dense2", "dense3")}
        query_in = normed if query_source is None else query_source
        q = heads(query_in @ dense["dense1"][0].T + dense["dense1"][1])
        k = heads(normed @ dense["dense2"][0].T + dense["dense2"][1])
        v = heads(normed @ dense["dense3"][0].T + dense["dense3"][1])
        score = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim) + adder
        probs = np.exp(score - score.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, HIDDEN)
        x = x + context @ t[f"{prefix}.attention.projection.weight"] + t[f"{prefix}.attention.projection.bias"]
        normed = _layer_norm(x, t[f"{prefix}.layernorm2.gamma"], t[f"{prefix}.layernorm2.beta"])
        hidden = _gelu(normed @ t[f"{prefix}.output.mapping.weight"] + t[f"{prefix}.output.mapping.bias"])
        return x + hidden @ t[f"{prefix}.output.projection.weight"] + t[f"{prefix}.output.projection.bias"]

    x = word[ids] + position[positions]
    for index in range(LAYERS - 1):
        x = block(f"backbone.blocks.{index}", x)
    x = _layer_norm(x, t["backbone.layernorm.gamma"], t["backbone.layernorm.beta"])
    x = block("backbone.top_query_layer", x, query_source=top_query[positions])
    return x @ word.T


def official_greedy(tensors: dict, naming: str, prompt: list, new: int):
    """(tokens, smallest top-1 margin) of greedy decoding, recomputing the whole sequence each step."""
    tokens, margin = list(prompt), np.inf
    for _ in range(new):
        logits = official_logits(tensors, naming, np.array([tokens]))[0, -1]
        top = np.sort(logits)[-2:]
        margin = min(margin, top[1] - top[0])
        tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt):], margin


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _import(capsys, ckpt, out, *extra):
    return _cli(capsys, "import", "pangu-alpha", "--ckpt", ckpt, "--out", out, "--num-heads", HEADS, *extra)


def _our_logits(checkpoint: str, ids: np.ndarray) -> np.ndarray:
    model = load_model(describe_checkpoint(checkpoint))
    logits, _, _ = model.logits(ms.Tensor(ids.astype(np.int32)), ms.Tensor(np.zeros(ids.shape[0], np.int32)))
    return logits.asnumpy()


def _ids(seed=1, batch=2):
    return np.random.default_rng(seed).integers(10, VOCAB, (batch, SEQ))


def _close(got, expected):
    """1e-5 of the logits' scale: float32 rounding through a few layers, far below any weight's effect."""
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """Each naming's release file, its tensors, and what import made of it."""
    root = tmp_path_factory.mktemp("releases")
    made = {}
    for seed, naming in enumerate(TABLES):
        tensors = make_release(naming, seed)
        path = save_release(tensors, root / f"{naming}.ckpt")
        out = root / f"{naming}_imported.ckpt"
        assert main(["import", "pangu-alpha", "--ckpt", path, "--out", str(out), "--num-heads", str(HEADS)]) == 0
        made[naming] = (path, tensors, str(out))
    return made


@pytest.mark.parametrize("naming", list(TABLES))
def test_an_imported_release_computes_the_official_logits_and_greedy_continuation(releases, naming, capsys):
    path, tensors, imported = releases[naming]
    ids = _ids()
    _close(_our_logits(imported, ids), official_logits(tensors, naming, ids))
    described = describe_checkpoint(imported)
    assert described.config.model.activation == "gelu" and described.config.model.num_layers == LAYERS
    assert described.tokenizer.kind == "pangu_alpha" and described.config.model.eod_token_id == 9
    prompt = "盘古大模型"
    prompt_ids = described.tokenizer.encode(prompt)
    expected, margin = official_greedy(tensors, naming, prompt_ids, 5)
    assert margin > 1e-3  # the argmax is well separated, so float32 and float64 must agree
    code, out, _ = _cli(capsys, "generate", "--ckpt", imported, "--prompt", prompt, "--max-new-tokens", 5, "--greedy")
    assert code == 0
    ends = [i for i, token in enumerate(expected) if token == 9]
    expected = expected[:ends[0]] if ends else expected
    assert out.rstrip("\n") == described.tokenizer.decode(prompt_ids + expected)


def test_a_half_precision_release_loads_as_float32(tmp_path, capsys):
    tensors = make_release("mindformers", 7)
    path = save_release(tensors, tmp_path / "fp16.ckpt", ms.float16)
    out = tmp_path / "fp16_imported.ckpt"
    assert _import(capsys, path, out)[0] == 0
    rounded = {name: value.astype(np.float16).astype(np.float32) for name, value in tensors.items()}
    weights = model_weights(describe_checkpoint(str(out)))
    assert all(value.dtype == np.float32 for value in weights.values())
    ids = _ids(3)
    _close(_our_logits(str(out), ids), official_logits(rounded, "mindformers", ids))


def _strategy_item(split_axis, ndim):
    """MindSpore's layout of a tensor split in two along ``split_axis`` (None: whole on both ranks)."""
    tensor_map = [-1] * ndim
    if split_axis is not None:
        tensor_map[split_axis] = 0  # the last (only) device-matrix axis
    return {"dev_matrix": [2], "tensor_map": tensor_map, "param_split_shape": [], "indices_offset": [], "field": 0,
            "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}


def test_a_two_shard_release_with_its_strategy_file_merges_to_the_same_logits(tmp_path, capsys):
    """PCL's shipped form: flat per-rank files (filerted_N.ckpt), a strategy file, and the tables as .npy."""
    tensors = make_release("pcl", 11)
    folder = tmp_path / "release"
    folder.mkdir()
    word, position, top_query = TABLES["pcl"]
    for table, file_name in ((word, "word_embedding.npy"), (position, "position_embedding.npy"),
                             (top_query, "top_query_embedding.npy")):
        np.save(folder / file_name, tensors[table])
    splits = {}
    for name, value in tensors.items():
        if name in (word, position, top_query):
            continue
        if ".dense" in name:  # Megatron-style: q/k/v split by output rows, the output projections by input rows
            splits[name] = 0
        elif "output.mapping" in name:
            splits[name] = value.ndim - 1
        elif name.endswith("projection.weight"):
            splits[name] = 0
        else:
            splits[name] = None
    for rank in range(2):
        part = {}
        for name, axis in splits.items():
            value = tensors[name]
            if axis is not None:
                value = np.split(value, 2, axis=axis)[rank]
            part[name] = value
        save_release(part, folder / f"filerted_{rank}.ckpt")
    strategy = tmp_path / "strategy.json"
    strategy.write_text(json.dumps({"current_stage": 0, "parallel_strategy_item": {}, "parallel_layout_item": {
        name: _strategy_item(axis, tensors[name].ndim) for name, axis in splits.items()}}))
    code, _, err = _import(capsys, folder, tmp_path / "one_file.ckpt")
    assert code == 2 and "--strategy" in err and err.count("\n") == 1  # parts without their strategy
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{}")
    code, _, err = _import(capsys, folder, tmp_path / "one_file.ckpt", "--strategy", garbage)
    assert code == 2 and "--strategy" in err and err.count("\n") == 1
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process that no longer runs left its scratch folder behind (killed mid-merge)
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())  # as atomic.py names temporaries
    stale = tmp_path / f".pangu-alpha-merge.tmp-{host}-{gone.pid}-abc"
    (stale / "merged").mkdir(parents=True)
    out = tmp_path / "merged.ckpt"
    code, _, err = _import(capsys, folder, out, "--strategy", strategy)
    assert code == 0, err
    ids = _ids(5)
    _close(_our_logits(str(out), ids), official_logits(tensors, "pcl", ids))
    assert not [p for p in os.listdir(tmp_path) if "pangu-alpha-merge" in p]  # this run's scratch and the stale one


def test_a_release_folder_with_one_checkpoint_takes_pcls_tables_from_npy_files(tmp_path, capsys):
    tensors = make_release("pcl", 13)
    folder = tmp_path / "release"
    folder.mkdir()
    for table, file_name in zip(TABLES["pcl"], ("word_embedding.npy", "position_embedding.npy",
                                                 "top_query_embedding.npy")):
        np.save(folder / file_name, tensors[table])
    save_release({n: v for n, v in tensors.items() if n not in TABLES["pcl"]}, folder / "pangu_alpha.ckpt")
    out = tmp_path / "imported.safetensors"
    code, _, err = _import(capsys, folder, out)
    assert code == 0, err
    ids = _ids(6)
    _close(_our_logits(str(out), ids), official_logits(tensors, "pcl", ids))


@pytest.mark.parametrize("naming", ["pcl", "mindformers"])
def test_import_then_export_gives_back_the_release_bit_for_bit_and_export_then_import_too(releases, naming, tmp_path,
                                                                                       capsys):
    path, tensors, imported = releases[naming]
    exported = tmp_path / "exported.ckpt"
    code, _, err = _cli(capsys, "export", "pangu-alpha", "--ckpt", imported, "--out", exported, "--naming", naming)
    assert code == 0, err
    back = {name: value.asnumpy() for name, value in ms.load_checkpoint(str(exported)).items()}
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
    other = "mindformers" if naming == "pcl" else "pcl"  # across namings: export the other, import it again
    crossed = tmp_path / "crossed.ckpt"
    assert _cli(capsys, "export", "pangu-alpha", "--ckpt", imported, "--out", crossed, "--naming", other)[0] == 0
    again = tmp_path / "again.ckpt"
    assert _import(capsys, crossed, again)[0] == 0
    first, second = model_weights(describe_checkpoint(imported)), model_weights(describe_checkpoint(str(again)))
    assert sorted(first) == sorted(second)
    assert all(np.array_equal(first[name], second[name]) for name in first)


def test_export_refuses_a_sparse_model_in_one_line(trained_sigma, tmp_path, capsys):
    code, _, err = _cli(capsys, "export", "pangu-alpha", "--ckpt", trained_sigma[2], "--out", tmp_path / "x.ckpt")
    assert code == 2 and "sparse layers" in err and err.count("\n") == 1
    assert not (tmp_path / "x.ckpt").exists()


def _sigma_config(tmp_path, **model):
    import yaml

    raw = {"model": dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_heads=HEADS, ffn_hidden_size=FFN, num_layers=LAYERS,
                         dense_layers=1, sparse_layers=2, seq_length=SEQ, eod_token_id=9, activation="gelu", **model),
           "moe": dict(router="rre", num_experts=6, num_domains=3, experts_per_domain=2, table_balance="uniform")}
    path = tmp_path / "sigma.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_sigma_inherited_from_an_imported_release_computes_its_logits_on_every_domain(releases, tmp_path, capsys):
    _, tensors, imported = releases["pcl"]
    out = tmp_path / "sigma.ckpt"
    code, _, err = _cli(capsys, "inherit", "--dense", imported, "--config", _sigma_config(tmp_path), "--out", out)
    assert code == 0, err
    sigma = load_model(describe_checkpoint(str(out)))
    ids = _ids(9)
    expected = official_logits(tensors, "pcl", ids)
    for domain in range(3):
        logits, _, _ = sigma.logits(ms.Tensor(ids.astype(np.int32)), ms.Tensor(np.full(ids.shape[0], domain, np.int32)))
        _close(logits.asnumpy(), expected)
    code, _, err = _cli(capsys, "inherit", "--dense", imported, "--config",
                        _sigma_config(tmp_path, layernorm_epsilon=1e-6), "--out", tmp_path / "other.ckpt")
    assert code == 2 and "layernorm_epsilon" in err


def test_the_13b_backbone_sigma_config_is_what_inherit_accepts_for_an_imported_13b_release():
    from mindformers_sigma.config import load_config
    from mindformers_sigma.lifecycle.inherit import BACKBONE_KEYS
    from mindformers_sigma.pangu_alpha.conversion import PRESETS, imported_config
    from mindformers_sigma.pangu_alpha.namings import NAMINGS

    layers, hidden, heads = PRESETS["13b"]
    shapes = {name: SimpleNamespace(shape=shape) for name, shape in (  # the 13B release's shapes, not its bytes
        ("embedding_table", (40000, hidden)), ("backbone.embedding.embedding.position_embedding.embedding_table",
                                               (1024, hidden)),
        ("backbone.blocks.0.output.mapping.weight", (hidden, 4 * hidden)))}
    imported = imported_config(shapes, NAMINGS["pcl"], layers, heads, "gelu", 9, "13b")
    sigma = load_config(os.path.join(os.path.dirname(__file__), "..", "ascend_configs",
                                     "pangu_sigma_13b_backbone.yaml"))
    assert [getattr(sigma.model, k) for k in BACKBONE_KEYS] == [getattr(imported.model, k) for k in BACKBONE_KEYS]


def _release_variant(tmp_path, name, change):
    tensors = make_release("pcl", 3)
    change(tensors)
    return save_release(tensors, tmp_path / name)


def test_bad_releases_and_arguments_are_one_line_each_and_write_nothing(tmp_path, capsys):
    good = save_release(make_release("pcl", 3), tmp_path / "good.ckpt")
    with open(good, "rb") as handle:
        data = handle.read()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[:len(data) // 2])
    unknown = _release_variant(tmp_path, "unknown.ckpt",
                               lambda t: t.__setitem__("backbone.blocks.0.attention.dense4.weight", np.zeros((2, 2))))
    missing = _release_variant(tmp_path, "missing.ckpt", lambda t: t.pop("backbone.blocks.1.output.mapping.bias"))
    contradicted = _release_variant(tmp_path, "contradicted.ckpt", lambda t: t.__setitem__(
        "backbone.blocks.1.attention.dense2.weight", np.zeros((HIDDEN, HIDDEN - 1), np.float32)))
    pipeline = _release_variant(tmp_path, "pipeline.ckpt", lambda t: [
        t.__setitem__(name.replace("backbone.top_query_layer", f"backbone.blocks.{LAYERS - 1}"), t.pop(name))
        for name in [n for n in t if n.startswith("backbone.top_query_layer")]])
    not_finite = _release_variant(tmp_path, "nan.ckpt", lambda t: t["backbone.blocks.0.output.mapping.weight"]
                                  .__setitem__((3, 5), np.nan))
    integer_path = tmp_path / "int.ckpt"
    integers = make_release("pcl", 3)
    integers["backbone.layernorm.gamma"] = np.ones(HIDDEN, np.int32)
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in integers.items()], str(integer_path))
    flat_table = _release_variant(tmp_path, "flat.ckpt", lambda t: t.__setitem__("embedding_table",
                                                                                  t["embedding_table"].reshape(-1)))
    cases = [
        ((good, "--num-heads", 5), "--num-heads 5"),
        ((good, "--preset", "13b"), "--preset 13b"),
        ((truncated, "--num-heads", HEADS), "truncated"),
        ((unknown, "--num-heads", HEADS), "unknown tensor backbone.blocks.0.attention.dense4.weight"),
        ((missing, "--num-heads", HEADS), "missing tensor backbone.blocks.1.output.mapping.bias"),
        ((contradicted, "--num-heads", HEADS), "backbone.blocks.1.attention.dense2.weight has shape"),
        ((pipeline, "--num-heads", HEADS), "pipeline"),
        ((tmp_path / "absent.ckpt", "--num-heads", HEADS), "no such file"),
        ((not_finite, "--num-heads", HEADS), "backbone.blocks.0.output.mapping.weight holds NaN"),
        ((integer_path, "--num-heads", HEADS), "tensor backbone.layernorm.gamma is Int32"),
        ((flat_table, "--preset", "2.6b"), "embedding_table has shape (1280000,)"),
        ((good, "--num-heads", HEADS, "--tokenizer", good), "--tokenizer"),
    ]
    for (ckpt, *heads), words in cases:
        out = tmp_path / "out.ckpt"
        code, _, err = _cli(capsys, "import", "pangu-alpha", "--ckpt", ckpt, "--out", out, *heads)
        assert code == 2 and words in err and err.count("\n") == 1, (words, err)
        assert "Traceback" not in err
        assert sorted(os.listdir(tmp_path)) == sorted(["good.ckpt", "truncated.ckpt", "unknown.ckpt", "missing.ckpt",
                                                        "contradicted.ckpt", "pipeline.ckpt", "nan.ckpt", "int.ckpt",
                                                        "flat.ckpt"]), words
    code, _, err = _cli(capsys, "tokenize", "--ckpt", good, "--text", "a\udcffb")  # undecodable bytes from a shell
    assert code == 2 and "--text: not UTF-8" in err and err.count("\n") == 1


def _official_tokenizer():
    """The official JIEBATokenizer, loaded from the installed pcl-pangu (without its package __init__,
    which needs more than the tokenizer)."""
    root = list(importlib.util.find_spec("pcl_pangu").submodule_search_locations)[0]
    source = os.path.join(root, "tokenizer", "tokenization_jieba.py")
    spec = importlib.util.spec_from_file_location("official_tokenization_jieba", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.JIEBATokenizer(os.path.join(root, "tokenizer", "bpe_4w_pcl", "vocab"))


TEXTS = [
    "中国的首都是北京，长城是世界上最长的建筑。",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "PanGu-Σ 是一个拥有 1.085 万亿参数的稀疏模型 (sparse model)。",
    "two  spaces,   three,\n\n\nnewlines   and\ttab",
    "",
]


def test_the_tokenizer_equals_the_official_jieba_tokenizer(releases, capsys):
    official = _official_tokenizer()
    ours = describe_checkpoint(releases["pcl"][2]).tokenizer
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == official.tokenize(text), text
        assert ours.decode(ids) == official.decode(ids), text
    assert ours.decode(ours.encode(TEXTS[2])) == TEXTS[2]  # code round-trips exactly, indentation and all
    code, out, _ = _cli(capsys, "tokenize", "--ckpt", releases["pcl"][2], "--text", TEXTS[3], "--json")
    assert code == 0 and json.loads(out) == {"ids": official.tokenize(TEXTS[3])}


def test_prepare_data_with_an_imported_checkpoint_tokenizes_as_pangu_alpha(releases, tmp_path, capsys):
    from mindformers_sigma.data.dataset import PreparedCorpus

    source = tmp_path / "zh"
    source.mkdir()
    documents = [TEXTS[0], TEXTS[3], TEXTS[2]]
    for index, document in enumerate(documents):  # a .txt file is one document
        (source / f"{index}.txt").write_text(document, encoding="utf-8")
    out = tmp_path / "prepared"
    code, _, err = _cli(capsys, "prepare-data", "--domain", f"zh={source}", "--out", out, "--seq-length", SEQ,
                        "--tokenizer", releases["pcl"][2])
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "pangu_alpha" and manifest["eod_token_id"] == 9
    official = _official_tokenizer()
    stream = [token for doc in documents for token in official.tokenize(doc) + [9]]
    samples = PreparedCorpus(str(out)).samples[0]
    assert samples.reshape(-1)[:len(stream)].tolist() == stream


def test_the_gelu_composition_equals_mindspores_gelu_kernel():
    from mindspore import ops

    from mindformers_sigma.activations import gelu

    x = ms.Tensor(np.linspace(-8, 8, 4001, dtype=np.float32))
    ours, kernel = gelu(x).asnumpy(), ops.GeLU()(x).asnumpy()
    np.testing.assert_allclose(ours, kernel, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(kernel).max())


def test_eval_without_domain_scores_every_corpus_domain_as_the_official_computation(releases, tmp_path, capsys):
    """A dense model has one domain, ``general``; it scores a corpus of other domains, with no --domain."""
    from mindformers_sigma.data.dataset import PreparedCorpus

    _, tensors, imported = releases["mindformers"]
    sources = {"zh": [TEXTS[0], TEXTS[3]], "code": [TEXTS[2], TEXTS[1]]}
    for name, documents in sources.items():
        (tmp_path / name).mkdir()
        for index, document in enumerate(documents):
            (tmp_path / name / f"{index}.txt").write_text(document, encoding="utf-8")
    prepared = tmp_path / "prepared"
    assert _cli(capsys, "prepare-data", *[f"--domain={n}={tmp_path / n}" for n in sources], "--out", prepared,
                "--seq-length", SEQ, "--tokenizer", imported)[0] == 0
    code, out, err = _cli(capsys, "eval", "perplexity", "--ckpt", imported, "--data", prepared, "--split", "train",
                          "--json")
    assert code == 0, err
    reported = json.loads(out)["domains"]
    corpus = PreparedCorpus(str(prepared))
    for name, samples in zip(corpus.names, corpus.samples):
        assert (samples[:, :-1] == 9).any(axis=1).any()  # EOD inside a sample: the reset is exercised
        logits = official_logits(tensors, "mindformers", samples[:, :-1], eod=9)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        picked = np.take_along_axis(log_probs, samples[:, 1:, None], -1)[..., 0]
        counted = samples[:, :-1] != 9
        assert reported[name]["tokens"] == counted.sum()
        np.testing.assert_allclose(reported[name]["mean_nll"], -picked[counted].mean(), rtol=1e-5)
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"context": "中国的首都是", "choices": ["北京", "长城"], "label": 0},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    code, out, err = _cli(capsys, "eval", "zeroshot", "--ckpt", imported, "--task", task, "--json")
    assert code == 0, err
    assert json.loads(out)["domain"] == "general"
