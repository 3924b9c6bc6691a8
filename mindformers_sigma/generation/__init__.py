"""Text generation: prompts to padded batches (``prompts``), a KV-cached decoder of fixed shapes
(``kv_cache``), the recompute-everything reference (``full_recompute``), token choice (``sampling``)
and the loop that ties them (``generator``)."""
