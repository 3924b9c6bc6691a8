"""A real multiple-choice task from held-out documents: which continuation does this passage really have?

Each record takes one held-out document of the domain: its first ``context_tokens`` tokens are the
context, the next ``continuation_tokens`` the right choice; the wrong choices are spans of the same
length cut at random from other held-out documents of the same domain.  The right choice's place
is drawn from the seed, so chance is 1 / choices.
"""

from __future__ import annotations

from typing import List

import numpy as np

from mindformers_sigma.data.prepare import unpack_documents
from mindformers_sigma.data.tokenizer import Tokenizer
from mindformers_sigma.errors import DataError


def make_records(samples: np.ndarray, tokenizer: Tokenizer, domain: str, choices: int, count: int,
                 context_tokens: int, continuation_tokens: int, seed: int) -> List[dict]:
    """Up to ``count`` records from the held-out ``samples`` of ``domain``."""
    documents = unpack_documents(samples)
    need = context_tokens + continuation_tokens
    passages = [doc for doc in documents if len(doc) >= need]
    spans = [doc for doc in documents if len(doc) >= continuation_tokens]
    if not passages or len(spans) < choices:
        raise DataError(f"domain {domain!r}: its held-out split has {len(passages)} documents of at least {need} "
                        f"tokens and {len(spans)} of at least {continuation_tokens}; make-task needs one and "
                        f"{choices}: hold out more documents (prepare-data --holdout), or lower --choices / "
                        f"--context-tokens / --continuation-tokens")
    rng = np.random.default_rng(seed)
    records = []
    for doc_index in rng.permutation(len(passages))[:count].tolist():
        passage = passages[doc_index]
        truth = tokenizer.decode(passage[context_tokens:need])
        options, others = [truth], [d for d in spans if d is not passage]
        for other in rng.permutation(len(others)).tolist():
            if len(options) == choices:
                break
            start = int(rng.integers(0, len(others[other]) - continuation_tokens + 1))
            text = tokenizer.decode(others[other][start:start + continuation_tokens])
            if text and text not in options:
                options.append(text)
        if len(options) < choices:
            continue  # too few distinct spans for this passage
        order = rng.permutation(choices).tolist()
        records.append({"context": tokenizer.decode(passage[:context_tokens]),
                        "choices": [options[i] for i in order], "label": order.index(0)})
    return records
