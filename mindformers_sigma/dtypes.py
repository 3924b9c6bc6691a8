"""The compute dtype named by ``model.compute_dtype``, shared by ``model/`` and ``moe/``.

It lives outside both packages so that imports run one way: ``model/`` uses ``moe/``,
and neither reaches back into the other for this lookup.
"""

import mindspore as ms

_DTYPES = {"float32": ms.float32, "float16": ms.float16}


def dtype_of(name: str):
    """MindSpore dtype for a config's ``compute_dtype`` string."""
    return _DTYPES[name]
