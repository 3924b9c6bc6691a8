"""The one place that talks to MindSpore's global context: device, mode, seed, parallel mode.

Model code never asks which device it runs on; everything device- or parallel-specific is
decided here from the config.
"""

from __future__ import annotations

import mindspore as ms

from mindformers_sigma.config import ConfigError, SigmaConfig

_MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}


def configure_context(config: SigmaConfig) -> None:
    """Set device target, execution mode and seeds; refuse layouts the device cannot run."""
    ctx, parallel = config.context, config.parallel
    if parallel.device_num > 1:
        raise ConfigError(
            "parallel.device_num", parallel.device_num,
            "multi-device training needs a launcher (not available yet); use device_num: 1", config.source,
        )
    ms.set_context(mode=_MODES[ctx.mode])
    ms.set_device(ctx.device_target)
    ms.set_seed(ctx.seed)
