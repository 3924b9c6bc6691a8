"""Opening the training data named by the config, checked against the model it will feed."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.data.dataset import MixedCorpusSource, PreparedCorpus, SampleSchedule
from mindformers_sigma.data.manifest import read_corpus_tokenizer
from mindformers_sigma.data.synthetic import SyntheticSource
from mindformers_sigma.errors import DataError
from mindformers_sigma.tokenizer.kinds import AnyTokenizer

SYNTHETIC_FINGERPRINT = "synthetic"


@dataclass
class TrainingData:
    """A sample source with ``read(start, count)``, its domain names, token counts and identity."""

    source: object
    domain_names: List[str]
    token_frequency: Optional[np.ndarray]
    # What a checkpoint records to tell whether a resume reads the same data: a hash of the
    # prepared samples (a moved or re-prepared identical folder is the same data), or "synthetic"
    # (then the config defines the data).
    fingerprint: str
    # The prepared data's tokenizer (its file sha256-checked with the shards), None for synthetic data.
    tokenizer: Optional[AnyTokenizer] = None


def content_fingerprint(manifest: dict) -> str:
    """sha256 over what defines the samples (domains, shard and tokenizer hashes, lengths), not over
    the manifest's bytes, which also record how the source paths were spelled."""
    content = {
        "sample_length": manifest["sample_length"], "eod_token_id": manifest["eod_token_id"],
        "tokenizer": manifest["tokenizer"]["sha256"],
        "domains": [[d["id"], d["name"], d["samples"], [s["sha256"] for s in d["shards"]]]
                    for d in manifest["domains"]],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()


class DomainsRenumbered:
    """A sample source whose domain ids are mapped through ``ids`` (corpus id -> model id)."""

    def __init__(self, source, ids: np.ndarray):
        self.source = source
        self.ids = ids

    def read(self, start: int, count: int):
        tokens, domains = self.source.read(start, count)
        return tokens, self.ids[np.asarray(domains)]


def _model_domain_ids(corpus_names: List[str], model_domains: List[str], path: str) -> np.ndarray:
    """Each corpus domain's id in the model, found by name (a corpus of one added domain, say)."""
    missing = [name for name in corpus_names if name not in model_domains]
    if missing:
        raise DataError(f"{path}: domain {missing[0]!r} is not a domain of the checkpoint (it has "
                        f"{', '.join(model_domains)}); add it with `pangu-sigma add-domain`, or rename it")
    return np.array([model_domains.index(name) for name in corpus_names], np.int32)


def open_training_data(config: SigmaConfig, model_domains: Optional[List[str]] = None) -> TrainingData:
    """The config's data source; a corpus that does not fit the model is a one-line DataError.

    ``model_domains``: the domain names (in id order) of the checkpoint being continued; the corpus's
    domains then take those ids by name, so a corpus prepared for one new domain trains that domain."""
    model, data = config.model, config.data
    if data.source == "synthetic":
        source = SyntheticSource(model.vocab_size, model.seq_length, config.moe.num_domains,
                                 model.eod_token_id, data.seed)
        return TrainingData(source, [f"domain{i}" for i in range(config.moe.num_domains)], None,
                            SYNTHETIC_FINGERPRINT)
    corpus = PreparedCorpus(data.path)
    checks = [
        (corpus.vocab_size <= model.vocab_size, "model.vocab_size", model.vocab_size,
         f"is smaller than the tokenizer vocabulary of {data.path} ({corpus.vocab_size}); "
         f"raise it to at least {corpus.vocab_size}"),
        (corpus.sample_length == model.seq_length + 1, "model.seq_length", model.seq_length,
         f"does not match the samples of {data.path} (prepared with --seq-length {corpus.sample_length - 1})"),
        (len(corpus.names) <= config.moe.num_domains, "moe.num_domains", config.moe.num_domains,
         f"is smaller than the {len(corpus.names)} domains of {data.path}"),
        (corpus.manifest["eod_token_id"] == model.eod_token_id, "model.eod_token_id", model.eod_token_id,
         f"differs from the tokenizer's EOD id {corpus.manifest['eod_token_id']}"),
    ]
    for ok, field, value, rule in checks:
        if not ok:
            raise DataError(f"{config.source}: {field} = {value!r}: {rule}")
    weights = corpus.mixing_weights(data.domain_weights, config.source)
    schedule = SampleSchedule([s.shape[0] for s in corpus.samples], weights, data.seed)
    frequency = corpus.token_frequency(config.moe.num_domains, model.vocab_size)
    source = MixedCorpusSource(corpus, schedule)
    names = corpus.names + [f"domain{i}" for i in range(len(corpus.names), config.moe.num_domains)]
    if model_domains is not None:  # continuing a checkpoint: its names (and ids) stay, whatever the corpus holds
        if len(model_domains) != config.moe.num_domains:
            raise DataError(f"{config.source}: moe.num_domains = {config.moe.num_domains}, but the checkpoint being "
                            f"continued has {len(model_domains)} domains ({', '.join(model_domains)}); resume "
                            f"without --config to use the checkpoint's own config")
        ids = _model_domain_ids(corpus.names, list(model_domains), data.path)
        names = list(model_domains)
        if ids.tolist() != list(range(len(ids))):
            source = DomainsRenumbered(source, ids)
            counts = frequency[:len(corpus.names)]
            frequency = np.broadcast_to(counts.sum(0), frequency.shape).copy()  # domains without data: the total
            frequency[ids] = counts
    tokenizer_path = os.path.join(data.path, corpus.manifest["tokenizer"]["file"])
    tokenizer = read_corpus_tokenizer(data.path, corpus.manifest) if os.path.isfile(tokenizer_path) else None
    return TrainingData(source, names, frequency, content_fingerprint(corpus.manifest), tokenizer)
