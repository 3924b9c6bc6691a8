"""Reading prepared data: shards in sorted order, domain mixing, rank slices, resumable positions.

The sample order is a pure function of ``(seed, global position)``:

* position ``p`` draws its domain from ``default_rng([seed, p // BLOCK])`` with the mixing
  weights (one vectorised draw per block of positions);
* the ``k``-th draw of domain ``d`` is sample ``perm(seed, d, k // n_d)[k % n_d]``, a fresh
  permutation of the domain's samples per epoch.

So a reader started at any position ``p`` (a checkpoint's data position) yields exactly what
an uninterrupted reader yields from ``p``.  A global batch is ``batch_size * num_shards``
consecutive positions and rank ``shard_id`` takes its own contiguous ``batch_size`` of them,
so ranks read disjoint samples that together are the single-process global batch.
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from mindformers_sigma.data.manifest import HELDOUT, MANIFEST, TRAIN, load_manifest, split_shards, verify_files
from mindformers_sigma.errors import DataError

BLOCK = 4096


class PreparedCorpus:
    """All samples of a prepare-data folder, per domain, checked against its manifest.

    The manifest is validated in full and every shard, index and tokenizer file is checked
    against its sha256 before MindSpore reads any shard; the samples read are checked for
    domain, length and token ids within the vocabulary.
    """

    def __init__(self, data_dir: str, split: str = TRAIN):
        """``split``: ``train`` (what training reads) or ``heldout`` (documents prepare-data --holdout set aside)."""
        from mindspore.mindrecord import FileReader

        manifest = load_manifest(data_dir)
        if split == HELDOUT and not any(HELDOUT in domain for domain in manifest["domains"]):
            raise DataError(f"{data_dir}: has no held-out split; rerun prepare-data with --holdout FRACTION "
                            f"(e.g. 0.1)")
        verify_files(manifest, data_dir)
        self.manifest = manifest
        self.data_dir = data_dir
        self.sample_length = int(manifest["sample_length"])
        self.names: List[str] = [d["name"] for d in manifest["domains"]]
        self.samples: List[np.ndarray] = []
        for domain in manifest["domains"]:
            rows = []
            for shard in sorted(s["file"] for s in split_shards(domain, split)):
                path = os.path.join(data_dir, shard)
                reader = FileReader(path)
                try:
                    shard_rows = [self._sample_of(record, domain["id"], path) for record in reader.get_next()]
                finally:
                    reader.close()
                self._check_token_ids(shard_rows, path)
                rows += shard_rows
            samples = np.stack(rows) if rows else np.zeros((0, self.sample_length), np.int32)
            expected = domain["samples"] if split == TRAIN else domain.get(HELDOUT, {}).get("samples", 0)
            if samples.shape[0] != expected:
                raise DataError(f"{data_dir}: domain {domain['name']} has {samples.shape[0]} samples, manifest says "
                                f"{expected} ({split} split); rerun prepare-data")
            self.samples.append(samples)

    def _sample_of(self, record: dict, domain_id: int, path: str) -> np.ndarray:
        if int(record["domain_id"]) != domain_id:
            raise DataError(f"{path}: sample with domain_id {record['domain_id']} in the shard "
                            f"of domain {domain_id}; rerun prepare-data")
        row = np.asarray(record["input_ids"], dtype=np.int32)
        if row.shape != (self.sample_length,):
            raise DataError(f"{path}: sample of {row.size} tokens, manifest says sample_length "
                            f"{self.sample_length}; rerun prepare-data")
        return row

    def _check_token_ids(self, rows: List[np.ndarray], path: str) -> None:
        """Token ids index the embedding and frequency tables: one outside the vocabulary is an error here."""
        if not rows:
            return
        ids = np.stack(rows)
        outside = (ids < 0) | (ids >= self.vocab_size)
        if outside.any():
            raise DataError(f"{path}: token id {int(ids[outside][0])} is outside the tokenizer vocabulary of "
                            f"{self.vocab_size} (tokenizer.vocab_size in {MANIFEST}); rerun prepare-data")

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def require_tokenizer(self, model: Optional[bytes], flag: str) -> None:
        """Refuse a folder prepared with another tokenizer than ``model`` (a checkpoint's): its token
        ids would mean other text.  ``model`` None: the checkpoint has no tokenizer to compare."""
        if model is not None and self.manifest["tokenizer"]["sha256"] != hashlib.sha256(model).hexdigest():
            raise DataError(f"{flag} {self.data_dir}: prepared with another tokenizer than the model's; prepare it "
                            f"with prepare-data --tokenizer CKPT")

    def token_frequency(self, num_domains: int, vocab_size: int) -> np.ndarray:
        """``[num_domains, vocab_size]`` counts for the RRE tables; domains without data get the total."""
        table = np.zeros((num_domains, vocab_size), dtype=np.float64)
        for domain in self.manifest["domains"]:
            frequency = domain["token_frequency"]
            table[domain["id"], np.asarray(frequency["ids"], dtype=np.int64)] = frequency["counts"]
        table[len(self.names):] = table[: len(self.names)].sum(0)
        return table

    def mixing_weights(self, domain_weights: Optional[Dict[str, float]], source: str) -> np.ndarray:
        """Normalised per-domain weights: from config, or proportional to sample counts."""
        if domain_weights is None:
            weights = np.array([s.shape[0] for s in self.samples], dtype=np.float64)
        else:
            for name in domain_weights:
                if name not in self.names:
                    raise DataError(f"{source}: data.domain_weights.{name}: not a domain of {self.data_dir} "
                                    f"(domains: {', '.join(self.names)})")
                if not np.isfinite(float(domain_weights[name])):  # inf would make every probability NaN
                    raise DataError(f"{source}: data.domain_weights.{name}: {domain_weights[name]} is not a "
                                    f"finite number; give a finite weight >= 0")
            weights = np.array([float(domain_weights.get(n, 0.0)) for n in self.names])
        if weights.sum() <= 0:
            raise DataError(f"{source}: data.domain_weights: weights sum to 0; give at least one positive weight")
        return weights / weights.sum()


class SampleSchedule:
    """Which (domain, sample) each global position reads; see the module docstring."""

    def __init__(self, domain_sizes: Sequence[int], weights: np.ndarray, seed: int):
        self.sizes = np.asarray(domain_sizes, dtype=np.int64)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.seed = seed
        if (self.weights[self.sizes == 0] > 0).any():
            raise DataError("a domain with weight > 0 has no samples")
        self._seen_before_block = [np.zeros(len(self.sizes), dtype=np.int64)]
        self._recent_blocks: Dict[int, np.ndarray] = {}

    def _block_domains(self, block: int) -> np.ndarray:
        if block not in self._recent_blocks:
            if len(self._recent_blocks) >= 4:
                self._recent_blocks.pop(min(self._recent_blocks))
            self._recent_blocks[block] = np.random.default_rng([self.seed, block]).choice(
                len(self.sizes), size=BLOCK, p=self.weights)
        return self._recent_blocks[block]

    def _seen_before(self, block: int) -> np.ndarray:
        """Draws per domain in all blocks before ``block`` (memoised, so sequential reads stay O(1))."""
        while len(self._seen_before_block) <= block:
            done = len(self._seen_before_block) - 1
            self._seen_before_block.append(
                self._seen_before_block[-1] + np.bincount(self._block_domains(done), minlength=len(self.sizes)))
        return self._seen_before_block[block].copy()

    def _permutation(self, domain: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 1 + domain, epoch]).permutation(self.sizes[domain])

    def draws(self, start: int, count: int) -> Tuple[np.ndarray, np.ndarray]:
        """(domain ids, sample indices) of positions ``start .. start + count - 1``."""
        first_block = start // BLOCK
        seen = self._seen_before(first_block)
        last_block = (start + count - 1) // BLOCK
        domains = np.concatenate([self._block_domains(b) for b in range(first_block, last_block + 1)])
        offset = start - first_block * BLOCK
        before = domains[:offset]
        seen += np.bincount(before, minlength=len(self.sizes))
        domains = domains[offset: offset + count]
        indices = np.empty(count, dtype=np.int64)
        for domain in np.unique(domains):
            where = np.flatnonzero(domains == domain)
            ordinal = seen[domain] + np.arange(where.shape[0])
            epochs = ordinal // self.sizes[domain]
            for epoch in np.unique(epochs):
                chosen = epochs == epoch
                indices[where[chosen]] = self._permutation(domain, int(epoch))[ordinal[chosen] % self.sizes[domain]]
        return domains.astype(np.int32), indices


class MixedCorpusSource:
    """Prepared samples read in the order of a :class:`SampleSchedule`."""

    def __init__(self, corpus: PreparedCorpus, schedule: SampleSchedule):
        self.corpus = corpus
        self.schedule = schedule

    def read(self, start: int, count: int) -> Tuple[np.ndarray, np.ndarray]:
        domains, indices = self.schedule.draws(start, count)
        return np.stack([self.corpus.samples[d][i] for d, i in zip(domains, indices)]), domains


def batches(source, batch_size: int, start_position: int = 0, num_shards: int = 1,
            shard_id: int = 0) -> Iterator[Tuple[np.ndarray, np.ndarray, int]]:
    """Endless ``(tokens [B, L+1], domain_ids [B], next_position)`` for one data-parallel rank.

    ``source.read(start, count)`` gives the samples at global positions ``start..``; a global
    batch is ``batch_size * num_shards`` positions and this rank takes its own contiguous part.
    ``next_position`` is the global position to resume from after this batch.
    """
    if not 0 <= shard_id < num_shards:
        raise DataError(f"shard_id {shard_id}: must be in [0, num_shards={num_shards})")
    position = start_position
    while True:
        tokens, domains = source.read(position + shard_id * batch_size, batch_size)
        position += batch_size * num_shards
        yield tokens, domains, position
