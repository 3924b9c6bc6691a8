"""Starting a run: which checkpoint (if any) it continues, and whether that is the same experiment.

Decisions are made from the folder's contents before anything is written, so every
data-parallel rank reaches the same one.  A resume continues only the experiment the
checkpoint belongs to: the config keys that change the model, the routing or the data order
(:data:`EXPERIMENT_KEYS`) and the training data itself (a hash of its samples) must match,
unless the user passes ``--allow-config-change``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, List, Optional

from mindformers_sigma.checkpoint import files as ckpt
from mindformers_sigma.config import SigmaConfig, config_to_dict
from mindformers_sigma.errors import DataError
from mindformers_sigma.training.run_folder import CHECKPOINTS, ECSS_STORE, LOCK

# Keys whose change makes a different experiment: the model's function, the routing, the data order.
EXPERIMENT_KEYS = (
    "model.vocab_size", "model.hidden_size", "model.num_heads", "model.ffn_hidden_size", "model.num_layers",
    "model.dense_layers", "model.sparse_layers", "model.seq_length", "model.eod_token_id",
    "model.layernorm_epsilon", "model.dropout_rate", "model.compute_dtype",
    "moe.router", "moe.num_experts", "moe.num_domains", "moe.experts_per_domain", "moe.capacity_factor",
    "moe.routing_seed", "moe.table_balance", "moe.aux_loss_coef",
    "data.source", "data.seed", "data.domain_weights", "context.seed",
)
DATA_FINGERPRINT = "data_fingerprint"


def _value(config: dict, key: str):
    section, name = key.split(".")
    return config.get(section, {}).get(name, "<absent>")


def experiment_differences(saved_config: dict, config: SigmaConfig, saved_data: Optional[str],
                           data: str) -> List[str]:
    """``key (checkpoint -> now)`` for each experiment key that differs."""
    current = config_to_dict(config)
    changes = [f"{key} ({_value(saved_config, key)!r} -> {_value(current, key)!r})"
               for key in EXPERIMENT_KEYS if _value(saved_config, key) != _value(current, key)]
    if saved_data is not None and saved_data != data:
        changes.append(f"training data (fingerprint {saved_data[:12]}... -> {data[:12]}...)")
    return changes


def used_entries(out_dir: str) -> List[str]:
    """What ``out_dir`` holds besides the run lock and an empty checkpoints folder."""
    if not os.path.isdir(out_dir):
        if os.path.exists(out_dir):
            raise DataError(f"--out {out_dir}: exists and is not a folder; pass a folder path")
        return []
    entries = []
    for entry in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, entry)
        if entry in (LOCK, ECSS_STORE) or (entry == CHECKPOINTS and os.path.isdir(path) and not os.listdir(path)):
            continue
        entries.append(entry)
    return entries


def _refuse_used(out_dir: str, overwrite: bool, advice: str) -> None:
    used = used_entries(out_dir)
    if used and not overwrite:
        raise DataError(f"--out {out_dir}: not empty (holds {', '.join(used[:4])}); {advice}, --overwrite to "
                        f"replace its outputs, or choose a new folder")


def is_in_folder(path: str, folder: str) -> bool:
    """Whether file ``path`` lies directly in ``folder`` (however either is spelled)."""
    return os.path.isdir(folder) and os.path.samefile(os.path.dirname(os.path.abspath(path)), folder)


def choose_start(out_dir: Optional[str], resume: Optional[str], overwrite: bool,
                 log: Callable[[str], None]) -> Optional[ckpt.CheckpointInfo]:
    """The checkpoint to continue (None: start at step 0), or a one-line DataError."""
    if out_dir is not None and not out_dir.strip():
        raise DataError(f"--out {out_dir!r}: an empty path; pass a folder")
    if out_dir is not None and resume is None:
        _refuse_used(out_dir, overwrite, "pass --resume auto to continue that run")
        return None
    if resume is None:
        return None
    checkpoint_dir = os.path.join(out_dir, CHECKPOINTS) if out_dir else ""
    if resume == "auto":
        if out_dir is None:
            raise DataError("--resume auto: needs --out DIR (the run folder whose checkpoints/ to resume from)")
        reasons: List[str] = []
        info = ckpt.find_resume_checkpoint(checkpoint_dir, lambda line: (reasons.append(line), log(line)))
        if info is None and reasons:
            if not overwrite:
                raise DataError(f"--resume auto: none of the {len(reasons)} checkpoints in {checkpoint_dir} is "
                                f"usable (newest: {reasons[0].split(': ', 1)[-1]}); repair or remove them, or add "
                                f"--overwrite to start over")
            log(f"resume: no usable checkpoint in {checkpoint_dir}; starting over (--overwrite)")
        elif info is None:
            log(f"resume: no checkpoint in {checkpoint_dir}; starting from scratch")
        return info
    try:
        info = ckpt.read_checkpoint(os.path.splitext(os.path.normpath(resume))[0] + ".json")
    except ValueError as err:
        raise DataError(f"--resume {resume}: {err}; pass a checkpoint with its .json sidecar, or auto") from None
    if out_dir and not is_in_folder(info.weights_path, checkpoint_dir):
        # Continuing another folder's checkpoint here: this folder must not hold a run of its own.
        _refuse_used(out_dir, overwrite, f"--resume {resume} starts a new run folder from it; pass an empty --out")
        return info
    newer = [step for step in ckpt.list_checkpoints(checkpoint_dir) if step > info.step] if out_dir else []
    if newer and not overwrite:
        raise DataError(f"--resume {resume}: {checkpoint_dir} holds later checkpoints (steps "
                        f"{', '.join(map(str, newer[:4]))}) that this run would mix with; move them away, or add "
                        f"--overwrite to delete them")
    return info


def check_same_experiment(info: ckpt.CheckpointInfo, config: SigmaConfig, data_fingerprint: str,
                          allow_change: bool, log: Callable[[str], None]) -> None:
    """Refuse to continue a checkpoint under a config or data that make a different experiment."""
    changes = experiment_differences(info.meta.get("config", {}), config, info.meta.get(DATA_FINGERPRINT),
                                     data_fingerprint)
    if info.meta.get(ckpt.WEIGHTS_ONLY) is True:  # no data position to continue: only the model must match
        changes = [change for change in changes if change.startswith(("model.", "moe."))]
    if not changes:
        return
    if not allow_change:
        raise DataError(f"--resume {info.weights_path}: the run differs from the checkpoint's in "
                        f"{'; '.join(changes)}: a different model, routing or data order; resume with the "
                        f"checkpoint's config, or pass --allow-config-change to continue anyway")
    log(f"resume: continuing with changed {'; '.join(changes)} (--allow-config-change); the routing tables "
        f"are the checkpoint's")


def check_same_tokenizer(info: ckpt.CheckpointInfo, tokenizer_model: Optional[bytes]) -> None:
    """A checkpoint trained on text continues only on text tokenized by the same tokenizer: token ids
    mean nothing under another one."""
    record = info.meta.get("tokenizer")
    if not isinstance(record, dict):
        return  # trained on synthetic ids, or written before checkpoints recorded their tokenizer
    fix = f"prepare the data with the checkpoint's tokenizer (prepare-data --tokenizer {info.weights_path}) and pass --data"
    if tokenizer_model is None:
        raise DataError(f"--resume {info.weights_path}: its model reads text tokenized by its own tokenizer, and this "
                        f"run's data has none (synthetic, or no tokenizer.model); {fix}")
    if hashlib.sha256(tokenizer_model).hexdigest() != record.get("sha256"):
        raise DataError(f"--resume {info.weights_path}: the data's tokenizer differs from the checkpoint's (sha256 "
                        f"{hashlib.sha256(tokenizer_model).hexdigest()[:12]}... vs {str(record.get('sha256'))[:12]}...); "
                        f"{fix}")
