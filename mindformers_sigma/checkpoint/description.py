"""What a checkpoint says about itself, so that every command after training needs only ``--ckpt``.

The sidecar (``step_N.json``, written atomically after the weights) holds the config the run
trained with, the domain names in id order, and the tokenizer: the SentencePiece model file
itself (base64) with its sha256, so a checkpoint copied anywhere still decodes its tokens.
A checkpoint written before sidecars described themselves is refused in one line that says
which of ``--config`` and ``--data`` supplies what is missing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from mindformers_sigma.config import ConfigError, SigmaConfig, config_from_dict, config_to_dict, load_config
from mindformers_sigma.tokenizer.kinds import DEFAULT_KIND, AnyTokenizer, load_tokenizer
from mindformers_sigma.errors import DataError
from mindformers_sigma.checkpoint import files as ckpt

CONFIG, DOMAINS, TOKENIZER, DESCRIPTION_SHA256 = "config", "domains", "tokenizer", "description_sha256"


def _digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps([fields.get(k) for k in (CONFIG, DOMAINS, TOKENIZER)],
                                     sort_keys=True).encode()).hexdigest()


def description_fields(config: SigmaConfig, domain_names: List[str], tokenizer: Optional[AnyTokenizer]) -> dict:
    """The sidecar fields that describe a run: its config, domain names, the tokenizer (its kind and model
    file; None for synthetic data) and a sha256 over the three, so a damaged description is caught, not used."""
    record = None
    if tokenizer is not None:
        record = {"kind": tokenizer.kind, "sha256": hashlib.sha256(tokenizer.model_bytes).hexdigest(),
                  "model_base64": base64.b64encode(tokenizer.model_bytes).decode()}
    fields = {CONFIG: config_to_dict(config), DOMAINS: list(domain_names), TOKENIZER: record}
    return dict(fields, **{DESCRIPTION_SHA256: _digest(fields)})


@dataclass
class Description:
    """A checkpoint with everything needed to rebuild, name and feed its model."""

    info: ckpt.CheckpointInfo
    config: SigmaConfig
    domains: List[str]
    tokenizer: Optional[AnyTokenizer]  # None: trained on synthetic token ids

    @property
    def tokenizer_model(self) -> Optional[bytes]:
        """The tokenizer's model file, as written next to data and models (None: synthetic ids)."""
        return self.tokenizer.model_bytes if self.tokenizer is not None else None

    @property
    def one_domain(self) -> bool:
        """Whatever the domain id, the model computes the same: it is dense, or has one domain."""
        return self.config.model.sparse_layers == 0 or self.config.moe.num_domains == 1

    def chosen_domain(self, name: Optional[str], flag: str = "--domain") -> int:
        """The id of domain ``name``; without a name, 0 for a model with :attr:`one_domain`, else one line."""
        if name is not None:
            return self.domain_id(name, flag)
        if self.one_domain:
            return 0
        raise DataError(f"{flag}: {self.info.weights_path} has {len(self.domains)} domains with their own experts "
                        f"({', '.join(self.domains)}); name the one to use")

    def domain_id(self, name: str, flag: str = "--domain") -> int:
        """The id of domain ``name``; an unknown name is one line listing the known ones."""
        if name not in self.domains:
            raise DataError(f"{flag} {name!r}: not a domain of {self.info.weights_path}; known: "
                            f"{', '.join(self.domains)}")
        return self.domains.index(name)


def _sidecar_of(path: str, flag: str) -> str:
    """The sidecar of a checkpoint named by its weights file or by the sidecar itself."""
    if not os.path.exists(path):
        raise DataError(f"{flag} {path}: no such file; give a checkpoint's .ckpt, .safetensors or .json file, or a "
                        f"sharded step's folder")
    if path.endswith(".json"):
        return path
    if os.path.isdir(path):  # a sharded step's folder (checkpoint/sharded.py)
        return os.path.normpath(path) + ".json"
    step = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if re.fullmatch(r"rank_\d+", os.path.basename(os.path.dirname(os.path.abspath(path)))) and \
            os.path.isfile(step + ".json"):
        raise DataError(f"{flag} {path}: one rank's part of the sharded step {step}; pass the step folder (or "
                        f"{os.path.basename(step)}.json)")
    stem, suffix = os.path.splitext(path)
    if suffix not in ckpt.SUFFIX.values():
        raise DataError(f"{flag} {path}: not a checkpoint; give a step_N.ckpt, step_N.safetensors or step_N.json "
                        f"file of a run's checkpoints/ folder (or a NAME.ckpt written by inherit/extract/add-domain)")
    return stem + ".json"


def _tokenizer_from(record: dict, where: str) -> AnyTokenizer:
    try:
        model = base64.b64decode(record["model_base64"], validate=True)
        expected = record["sha256"]
        kind = record.get("kind", DEFAULT_KIND)
    except (KeyError, TypeError, AttributeError, binascii.Error):
        raise DataError(f"{where}: its tokenizer field is damaged; pass --data with the prepare-data folder "
                        f"the run trained on") from None
    if hashlib.sha256(model).hexdigest() != expected:
        raise DataError(f"{where}: its tokenizer does not match its sha256 (damaged); pass --data with the "
                        f"prepare-data folder the run trained on")
    return load_tokenizer(model, f"{where} (tokenizer)", kind)


def describe_checkpoint(path: str, config_path: Optional[str] = None,
                        trained_on: Optional[Callable[[], Tuple[List[str], AnyTokenizer]]] = None,
                        flag: str = "--ckpt") -> Description:
    """The checkpoint at ``path`` (weights file or sidecar, verified against its sha256) and what it was trained
    with; ``config_path`` / ``trained_on`` (reads the domain names and tokenizer of a ``--data`` folder:
    ``data.manifest.domains_and_tokenizer``) supply the config / domains and tokenizer of an older checkpoint
    (one that records them refuses both: two sources of truth would disagree silently)."""
    sidecar = _sidecar_of(path, flag)
    if not os.path.isfile(sidecar):
        raise DataError(f"{flag} {path}: no sidecar {os.path.basename(sidecar)} beside it; a checkpoint is the "
                        f"weights file and its sidecar, written together (keep the names they were written with)")
    try:
        info = ckpt.read_checkpoint(sidecar)
    except ValueError as err:
        raise DataError(f"{flag} {path}: {err}; keep a checkpoint's files under the names they were written "
                        f"with") from None
    meta = info.meta
    described = DOMAINS in meta or TOKENIZER in meta
    if described and meta.get(DESCRIPTION_SHA256) != _digest(meta):
        raise DataError(f"{sidecar}: its config, domains or tokenizer do not match their sha256 (damaged or "
                        f"edited); use an undamaged copy of the checkpoint")
    if described and (config_path is not None or trained_on is not None):
        raise DataError(f"{flag} {path}: records its own config, domains and tokenizer; drop --config and --data "
                        f"(they are for checkpoints written before sidecars described themselves)")
    if config_path is not None:
        config = load_config(config_path)
    elif meta.get(CONFIG):
        try:
            config = config_from_dict(meta[CONFIG], source=sidecar)
        except ConfigError as err:
            raise DataError(f"{err}; the recorded config is invalid: use an undamaged copy of the checkpoint, or "
                            f"one written by this version") from None
    else:
        raise DataError(f"{sidecar}: records no config; pass --config with the config the run trained with")
    if trained_on is not None:
        domains, tokenizer = trained_on()
    elif DOMAINS in meta and TOKENIZER in meta:
        domains = meta[DOMAINS]
        tokenizer = _tokenizer_from(meta[TOKENIZER], sidecar) if meta[TOKENIZER] is not None else None
    else:
        raise DataError(f"{sidecar}: records no domain names or tokenizer (written before checkpoints described "
                        f"themselves); pass --data with the prepare-data folder the run trained on")
    if not (isinstance(domains, list) and all(isinstance(name, str) for name in domains)
            and len(set(domains)) == len(domains) and len(domains) <= config.moe.num_domains
            and (trained_on is not None or len(domains) == config.moe.num_domains)):
        raise DataError(f"{sidecar}: its domain names {domains!r} do not fit moe.num_domains "
                        f"({config.moe.num_domains}); pass --data with the prepare-data folder the run trained on")
    domains = domains + [f"domain{i}" for i in range(len(domains), config.moe.num_domains)]
    return Description(info, config, domains, tokenizer)
