"""Typed, validated configuration: the YAML file is the single source of truth.

Every rule is checked when the file is loaded, so a bad value is reported as
``FILE: section.field = value: rule`` instead of failing deep inside graph
compilation.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from mindformers_sigma.errors import UserError


MAX_SEED = 2 ** 31 - 1
MAX_STEPS = 100_000_000
MAX_LAYERS = 1_000  # PanGu-Σ has 40; every layer is a Cell, a plan entry per parameter and a strategy-file item


def _short_repr() -> reprlib.Repr:
    """A bounded repr: a YAML anchor bomb or a huge list in a config value is shown in a few words,
    never expanded (a 2 KB anchor bomb's full repr is gigabytes)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxset = 2, 4, 4, 4, 4
    short.maxstring, short.maxother, short.maxlong = 80, 80, 40
    return short


_SHORT = _short_repr()


class ConfigError(UserError):
    """A config value breaks a rule; the message is one line that names file, field and fix."""

    def __init__(self, field_path: str, value: Any, rule: str, source: str = "<config>"):
        self.field_path = field_path
        self.value = value
        self.rule = rule
        self.source = source
        super().__init__(self._message())

    def _message(self) -> str:
        return f"{self.source}: {self.field_path} = {_SHORT.repr(self.value)}: {self.rule}"

    def with_source(self, source: str) -> "ConfigError":
        return ConfigError(self.field_path, self.value, self.rule, source)


@dataclass
class ModelConfig:
    """Shapes of the PanGu-α-style decoder."""

    vocab_size: int = 40000
    hidden_size: int = 5120
    num_heads: int = 40
    ffn_hidden_size: int = 20480
    num_layers: int = 40
    dense_layers: int = 32
    sparse_layers: int = 8
    seq_length: int = 1024
    eod_token_id: int = 6
    layernorm_epsilon: float = 1e-5
    dropout_rate: float = 0.0
    init_std: float = 0.02
    compute_dtype: Literal["float32", "float16"] = "float32"
    # the FFN's GeLU (activations.py): fast_gelu is this project's; gelu (tanh form) is MindSpore's nn.GELU, which
    # the official PanGu-α releases use, so an imported PanGu-α computes what the original computes
    activation: Literal["fast_gelu", "gelu"] = "fast_gelu"

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_heads", "ffn_hidden_size", "num_layers", "seq_length"):
            _require(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "must be >= 1")
        _require(self.num_layers <= MAX_LAYERS, "model.num_layers", self.num_layers, f"must be <= {MAX_LAYERS:,}")
        _require(self.dense_layers >= 0, "model.dense_layers", self.dense_layers, "must be >= 0")
        _require(self.sparse_layers >= 0, "model.sparse_layers", self.sparse_layers, "must be >= 0")
        _require(
            self.hidden_size % self.num_heads == 0, "model.hidden_size", self.hidden_size,
            f"must be divisible by model.num_heads ({self.num_heads}); change hidden_size or num_heads",
        )
        _require(
            self.dense_layers + self.sparse_layers == self.num_layers, "model.num_layers", self.num_layers,
            f"must equal dense_layers + sparse_layers ({self.dense_layers} + {self.sparse_layers}"
            f" = {self.dense_layers + self.sparse_layers})",
        )
        _require(
            0 <= self.eod_token_id < self.vocab_size, "model.eod_token_id", self.eod_token_id,
            f"must be a token id in [0, vocab_size={self.vocab_size})",
        )
        _require(0.0 <= self.dropout_rate < 1.0, "model.dropout_rate", self.dropout_rate, "must be in [0, 1)")
        _require(self.layernorm_epsilon > 0, "model.layernorm_epsilon", self.layernorm_epsilon, "must be > 0")
        _require(self.init_std > 0, "model.init_std", self.init_std, "must be > 0")


@dataclass(frozen=True)
class RouterKind:
    """What the rest of the project needs to know of a router (its Cell: ``moe/router.py``)."""

    # experts are a fixed function of (domain, token id): the host plans dispatch and ECSS's loads before
    # the step, a domain owns an expert group (extract, add-domain, inherit), and each layer has a routing table
    table_routed: bool
    learned_gate: bool  # a trained [H, E] gate, and the load-balancing loss
    top_k: int  # experts per token


ROUTERS = {
    "rre": RouterKind(table_routed=True, learned_gate=False, top_k=1),  # Random Routed Experts
    "switch": RouterKind(table_routed=False, learned_gate=True, top_k=1),  # Switch Transformer top-1
    "gshard": RouterKind(table_routed=False, learned_gate=True, top_k=2),  # GShard top-2, gates renormalised
}


@dataclass
class MoEConfig:
    """Sparse-layer routing: Random Routed Experts, or a learned-gate baseline with the same experts."""

    router: Literal[tuple(ROUTERS)] = "rre"
    num_experts: int = 640
    num_domains: int = 40
    experts_per_domain: int = 16
    # Expert buffer size per step = ceil(capacity_factor * routed tokens / num_experts);
    # null means every expert can take every token, so nothing is ever dropped.
    capacity_factor: Optional[float] = None
    routing_seed: int = 1234
    table_balance: Literal["frequency", "uniform"] = "frequency"
    aux_loss_coef: float = 0.01

    @property
    def table_routed(self) -> bool:
        return ROUTERS[self.router].table_routed

    @property
    def learned_gate(self) -> bool:
        return ROUTERS[self.router].learned_gate

    @property
    def top_k(self) -> int:
        return ROUTERS[self.router].top_k

    def validate(self) -> None:
        for name in ("num_experts", "num_domains", "experts_per_domain"):
            _require(getattr(self, name) >= 1, f"moe.{name}", getattr(self, name), "must be >= 1")
        _require(
            self.num_domains * self.experts_per_domain == self.num_experts, "moe.num_experts", self.num_experts,
            f"must equal num_domains * experts_per_domain ({self.num_domains} * {self.experts_per_domain}"
            f" = {self.num_domains * self.experts_per_domain})",
        )
        if self.capacity_factor is not None:
            _require(self.capacity_factor > 0, "moe.capacity_factor", self.capacity_factor,
                     "must be > 0, or null for no token dropping")
        _require(self.aux_loss_coef >= 0, "moe.aux_loss_coef", self.aux_loss_coef, "must be >= 0")
        _require(self.num_experts >= self.top_k, "moe.num_experts", self.num_experts,
                 f"{self.router} (top-{self.top_k}) needs >= {self.top_k} experts")
        _require_seed("moe.routing_seed", self.routing_seed)


@dataclass
class ParallelConfig:
    """How the model is laid out over processes (``docs/parallel.md``).

    stand_alone: one process.  hybrid_parallel (MindSpore's name for a model that splits itself and calls
    its own collectives): msrun or rank-table workers, ``data_parallel x model_parallel`` of them, the
    experts split over ``expert_parallel`` inside the data-parallel axis; the same code on CPU and Ascend."""

    mode: Literal["stand_alone", "hybrid_parallel"] = "stand_alone"
    device_num: int = 1
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    expert_parallel: int = 1
    micro_batch_num: int = 1
    optimizer_shard: bool = False
    recompute: bool = False
    # split the word embedding and the tied head on the vocabulary over model_parallel (else replicated)
    vocab_parallel: bool = False

    def validate(self) -> None:
        for name in ("device_num", "data_parallel", "model_parallel", "pipeline_stage",
                     "expert_parallel", "micro_batch_num"):
            _require(getattr(self, name) >= 1, f"parallel.{name}", getattr(self, name), "must be >= 1")
        product = self.data_parallel * self.model_parallel * self.pipeline_stage
        _require(
            product == self.device_num, "parallel.device_num", self.device_num,
            f"must equal data_parallel * model_parallel * pipeline_stage "
            f"({self.data_parallel} * {self.model_parallel} * {self.pipeline_stage} = {product})",
        )
        _require(
            self.micro_batch_num >= self.pipeline_stage, "parallel.micro_batch_num", self.micro_batch_num,
            f"must be >= pipeline_stage ({self.pipeline_stage}) so every stage has work",
        )
        if self.mode == "stand_alone":
            _require(self.device_num == 1, "parallel.device_num", self.device_num,
                     "must be 1 for parallel.mode stand_alone; use hybrid_parallel")


@dataclass
class ContextConfig:
    """Where and how MindSpore runs."""

    device_target: Literal["CPU", "Ascend", "GPU"] = "CPU"
    mode: Literal["graph", "pynative"] = "graph"
    seed: int = 42
    native_kernels: bool = True  # on CPU: this project's C kernels where MindSpore's are slow (native/)

    def validate(self) -> None:
        _require_seed("context.seed", self.seed)


@dataclass
class TrainConfig:
    """Optimizer and loop settings (PanGu-α defaults)."""

    batch_size: int = 8
    steps: int = 100
    learning_rate: float = 1e-4
    min_learning_rate: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    expert_eps: float = 1e-8
    grad_clip_norm: float = 1.0
    grad_accumulation_steps: int = 1
    # Dynamic loss scaling (for fp16): start, factor, and clean steps before growing.
    loss_scale: Literal["none", "dynamic"] = "none"
    initial_loss_scale: float = 4294967296.0
    loss_scale_factor: float = 2.0
    loss_scale_window: int = 1000
    # Peak FLOP/s of one device for model-FLOPs utilisation; null measures a matmul for ~1 s.
    peak_flops: Optional[float] = None
    log_interval: int = 10
    checkpoint_interval: int = 100
    keep_checkpoints: int = 3
    checkpoint_format: Literal["ckpt", "safetensors"] = "ckpt"
    # train only the experts: shared layers stay fixed, and an expert no batch routes to keeps its
    # weights and moments exactly (lazy AdamW), so training one new domain leaves the others bit-identical
    freeze_shared: bool = False

    def validate(self) -> None:
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        _require(1 <= self.steps <= MAX_STEPS, "train.steps", self.steps,
                 f"must be in [1, {MAX_STEPS:,}] (the learning-rate schedule holds one value per step)")
        _require(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "must be > 0")
        _require(0 <= self.min_learning_rate <= self.learning_rate, "train.min_learning_rate",
                 self.min_learning_rate, f"must be in [0, learning_rate={self.learning_rate}]")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, f"train.{name}", getattr(self, name), "must be in [0, 1)")
        for name in ("eps", "expert_eps"):
            _require(getattr(self, name) > 0, f"train.{name}", getattr(self, name), "must be > 0")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _require(self.grad_clip_norm >= 0, "train.grad_clip_norm", self.grad_clip_norm, "must be >= 0 (0 disables)")
        for name in ("grad_accumulation_steps", "loss_scale_window", "log_interval", "checkpoint_interval",
                     "keep_checkpoints"):
            _require(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "must be >= 1")
        _require(self.initial_loss_scale >= 1, "train.initial_loss_scale", self.initial_loss_scale, "must be >= 1")
        _require(self.loss_scale_factor > 1, "train.loss_scale_factor", self.loss_scale_factor, "must be > 1")
        if self.peak_flops is not None:
            _require(self.peak_flops > 0, "train.peak_flops", self.peak_flops, "must be > 0, or null to measure")


@dataclass
class DataConfig:
    """Where training samples come from."""

    # "synthetic": per-domain Markov token streams generated in memory (no files);
    # "mindrecord": a folder written by `pangu-sigma prepare-data`.
    source: Literal["synthetic", "mindrecord"] = "synthetic"
    path: Optional[str] = None
    # Mixing ratio per domain name; null mixes in proportion to each domain's samples.
    domain_weights: Optional[dict] = None
    seed: int = 0

    def validate(self) -> None:
        if self.source == "mindrecord":
            _require(self.path is not None, "data.path", self.path,
                     "must name a prepare-data folder when data.source is mindrecord")
        _require_seed("data.seed", self.seed)
        for name, weight in (self.domain_weights or {}).items():
            _require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight >= 0,
                     f"data.domain_weights.{name}", weight, "must be a number >= 0")


@dataclass
class EcssConfig:
    """Expert Computation and Storage Separation: every expert's weights and AdamW moments live on
    the host; each sparse layer's device copy is a slab of ``slab_experts`` slots into which the
    host loads the experts the step activates, and the host updates them (``ecss/``)."""

    enabled: bool = False
    # device slots per sparse layer; 0: the most one whole step can activate (ecss.slab.whole_step_slab).
    # Fewer reload the slab between micro-batches; ecss.slab.smallest_safe_slab is the least that works.
    slab_experts: int = 0
    # ram: numpy arrays; mmap: memory-mapped files under OUT/ecss_store (scratch, removed at the end)
    host_store: Literal["ram", "mmap"] = "ram"
    # read, plan and copy out the next step's experts in a background thread while a step runs
    prefetch: bool = True

    def validate(self) -> None:
        _require(self.slab_experts >= 0, "ecss.slab_experts", self.slab_experts,
                 "must be >= 0 (0: the most experts one whole step can activate)")


@dataclass
class SigmaConfig:
    """The whole run: one object per YAML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ecss: EcssConfig = field(default_factory=EcssConfig)
    source: str = "<config>"

    def validate(self) -> None:
        """Run every section's rules, then the rules that span sections."""
        for section in _SECTIONS:
            check = getattr(getattr(self, section), "validate", None)
            if check is not None:
                check()
        num_experts = self.moe.num_experts
        _require(
            num_experts % self.parallel.expert_parallel == 0, "parallel.expert_parallel",
            self.parallel.expert_parallel, f"must divide moe.num_experts ({num_experts})",
        )
        self._validate_layout()
        _require(not self.train.freeze_shared or self.model.sparse_layers > 0, "train.freeze_shared", True,
                 "trains only experts, and model.sparse_layers is 0; turn it off")
        if self.ecss.enabled:
            self._validate_ecss()

    def _validate_layout(self) -> None:
        """The rules a device layout puts on the model and the batch (per-parameter splits: ``parallel/layouts.py``)."""
        p = self.parallel
        _require(p.data_parallel % p.expert_parallel == 0, "parallel.expert_parallel", p.expert_parallel,
                 f"must divide parallel.data_parallel ({p.data_parallel}): experts are split over the "
                 f"data-parallel axis")
        _require(self.model.num_heads % p.model_parallel == 0, "parallel.model_parallel", p.model_parallel,
                 f"must divide model.num_heads ({self.model.num_heads}): attention is split by heads")
        _require(self.model.ffn_hidden_size % p.model_parallel == 0, "parallel.model_parallel", p.model_parallel,
                 f"must divide model.ffn_hidden_size ({self.model.ffn_hidden_size}): the FFN and the experts are "
                 f"split by their hidden features")
        _require(not p.vocab_parallel or self.model.vocab_size % p.model_parallel == 0, "parallel.model_parallel",
                 p.model_parallel, f"must divide model.vocab_size ({self.model.vocab_size}) with "
                 f"parallel.vocab_parallel: the word table is split by rows")
        _require(p.pipeline_stage <= self.model.num_layers, "parallel.pipeline_stage", p.pipeline_stage,
                 f"must be <= model.num_layers ({self.model.num_layers}): every stage needs a layer")
        per_step = p.data_parallel * p.micro_batch_num * self.train.grad_accumulation_steps
        _require(
            self.train.batch_size % per_step == 0, "train.batch_size", self.train.batch_size,
            f"(the global batch) must be divisible by data_parallel * micro_batch_num * grad_accumulation_steps "
            f"({per_step})",
        )

    def _validate_ecss(self) -> None:
        _require(not self.train.freeze_shared, "train.freeze_shared", True,
                 "ECSS already updates experts lazily on the host but trains the shared layers; turn one of "
                 "ecss.enabled and train.freeze_shared off")
        _require(self.model.sparse_layers >= 1, "ecss.enabled", True,
                 "needs model.sparse_layers >= 1: a model without sparse layers has no experts to keep on the host")
        _require(self.moe.table_routed, "ecss.enabled", True,
                 f"needs a table-routed moe.router (rre): the host must know each step's experts before the step, "
                 f"and a learned router ({self.moe.router}) only chooses them inside it")
        _require(self.moe.capacity_factor is None, "ecss.enabled", True,
                 "needs moe.capacity_factor: null (ECSS loads the experts of the host-made dropless plan)")
        held = self.moe.num_experts // self.parallel.expert_parallel
        _require(self.ecss.slab_experts <= held, "ecss.slab_experts", self.ecss.slab_experts,
                 f"(slots per rank) must be <= the {held} experts a rank holds (moe.num_experts / "
                 f"parallel.expert_parallel)")


_SECTIONS = ("model", "moe", "parallel", "context", "train", "data", "ecss")


def _require(ok: bool, field_path: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(field_path, value, rule)


def _require_seed(field_path: str, value: int) -> None:
    _require(0 <= value <= MAX_SEED, field_path, value, f"must be in [0, {MAX_SEED}] (MindSpore and numpy seeds)")


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(valid))}"


def _coerce(field_path: str, value: Any, annotation: Any) -> Any:
    """Check a YAML value against a dataclass annotation (ints are accepted where floats are)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(field_path, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(field_path, value, f"must be one of {', '.join(repr(a) for a in args)}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(field_path, value, "must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(field_path, value, "must be an integer")
        return value
    if annotation is float:
        if isinstance(value, str):  # PyYAML reads 1e-5 and 1.0e11 (no sign) as strings
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(field_path, value, "must be a number")
        if not math.isfinite(value):
            raise ConfigError(field_path, value, "must be a finite number (not .inf or .nan)")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(field_path, value, "must be a string")
        return value
    if annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(field_path, value, "must be a mapping")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {field_path}")


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(name, raw, "must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}", value, f"unknown key; {_suggest(str(key), fields)}")
        values[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**values)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}", key,
                                  "this key is given twice in the same mapping (the last would silently win); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str):
    """``yaml.safe_load`` with duplicate keys refused; this and nesting too deep for the parser, or an
    integer of more digits than Python converts, are a ConfigError without source."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError("<yaml>", "...", "invalid YAML (nested too deeply); a config is a shallow mapping") from None
    except ValueError as err:  # int() of a number with thousands of digits
        raise ConfigError("<yaml>", "...", f"invalid YAML value ({err})") from None


def config_from_dict(raw: Any, source: str = "<config>") -> SigmaConfig:
    """Build and validate a SigmaConfig from a parsed YAML mapping."""
    try:
        if raw is None:
            raise ConfigError("<top level>", "", f"the config is empty; give a mapping with sections {', '.join(_SECTIONS)}")
        if not isinstance(raw, dict):
            raise ConfigError("<top level>", type(raw).__name__, f"must be a mapping with sections {', '.join(_SECTIONS)}")
        for key in raw:
            if key not in _SECTIONS:
                raise ConfigError(str(key), "...", f"unknown section; {_suggest(str(key), _SECTIONS)}")
        hints = typing.get_type_hints(SigmaConfig)
        sections = {name: _build_section(name, hints[name], raw.get(name)) for name in _SECTIONS}
        config = SigmaConfig(**sections, source=source)
        config.validate()
    except ConfigError as err:
        raise err.with_source(source) from None
    return config


MAX_CONFIG_BYTES = 2 ** 20  # configs are a few KB; PyYAML parses a MiB in about a second


def load_config(path: str | os.PathLike) -> SigmaConfig:
    """Read, parse and validate a YAML config; every failure is a one-line ConfigError."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ConfigError("<file>", path, "is a folder; pass a YAML config file", path)
    if os.path.exists(path) and not os.path.isfile(path):
        raise ConfigError("<file>", path, "is not a regular file; pass a YAML config file", path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError("<file>", path, f"is larger than {MAX_CONFIG_BYTES // 2 ** 20} MiB; a config is a small "
                                              f"YAML file", path)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError("<file>", path, "file not found; pass an existing YAML config", path) from None
    except UnicodeDecodeError:
        raise ConfigError("<file>", path, "is not UTF-8 text; pass a YAML config", path) from None
    except OSError as err:
        raise ConfigError("<file>", path, f"cannot be read ({err.strerror})", path) from None
    try:
        raw = parse_yaml(text)
    except ConfigError as err:
        raise err.with_source(path) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "<yaml>"
        raise ConfigError(where, "...", f"invalid YAML ({getattr(err, 'problem', err)})", path) from None
    return config_from_dict(raw, source=path)


def config_to_dict(config: SigmaConfig) -> dict:
    """The config as plain YAML-ready data (for saving next to checkpoints)."""
    return {name: dataclasses.asdict(getattr(config, name)) for name in _SECTIONS}


def apply_overrides(config: SigmaConfig, overrides: typing.Sequence[str]) -> SigmaConfig:
    """``section.key=value`` settings (values in YAML syntax) applied together, then validated like the file."""
    if not overrides:
        return config
    raw = config_to_dict(config)
    for override in overrides:
        path, sep, text = override.partition("=")
        section, dot, key = path.partition(".")
        if not sep or not dot or not key:
            raise ConfigError("--set", override, "expected SECTION.KEY=VALUE, e.g. parallel.device_num=2", config.source)
        if section not in raw:
            raise ConfigError(f"--set {section}", override, f"unknown section; {_suggest(section, _SECTIONS)}",
                              config.source)
        try:
            raw[section][key] = parse_yaml(text)
        except (yaml.YAMLError, ConfigError):
            raise ConfigError(f"--set {path}", text, "is not a YAML value", config.source) from None
    return config_from_dict(raw, source=f"{config.source} (with --set {' '.join(overrides)})")
