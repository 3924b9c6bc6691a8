"""A real multiple-choice task from held-out documents: which continuation does this passage really have?

Each record takes one passage of a held-out document of the domain: its first ``context_tokens``
tokens are the context, the next ``continuation_tokens`` the right choice.  The wrong choices are the
continuations of other held-out passages of the same domain (other documents first): the same
span of their passages as the right choice is of its own, so right and wrong choices are drawn
alike and a model blind to the context is at chance.  (Spans cut anywhere in a passage were
not: they include documents' openings, headings and rule lines that are easy text, and put the
demo model at 0.171 on en_docs against a chance of 0.25.)  The right choice's place is drawn from
the seed, so chance is 1 / choices.
"""

from __future__ import annotations

from typing import List

import numpy as np

from mindformers_sigma.data.prepare import unpack_documents
from mindformers_sigma.errors import DataError
from mindformers_sigma.tokenizer.kinds import AnyTokenizer


def make_records(samples: np.ndarray, tokenizer: AnyTokenizer, domain: str, choices: int, count: int,
                 context_tokens: int, continuation_tokens: int, seed: int) -> List[dict]:
    """Up to ``count`` records from the held-out ``samples`` of ``domain``.

    A passage is a window of ``context_tokens + continuation_tokens`` tokens of one document (a long
    document gives several, none overlapping).  Wrong choices are the continuations of other
    passages, those of other documents first, so a domain with few long held-out documents still
    makes a task.
    """
    need = context_tokens + continuation_tokens
    passages = [(number, doc[start:start + need]) for number, doc in enumerate(unpack_documents(samples))
                for start in range(0, len(doc) - need + 1, need)]
    if len(passages) < choices:
        raise DataError(f"domain {domain!r}: its held-out split has {len(passages)} passages of {need} tokens; "
                        f"{choices} choices need {choices}: hold out more documents (prepare-data --holdout), or "
                        f"lower --choices / --context-tokens / --continuation-tokens")
    rng = np.random.default_rng(seed)
    records = []
    for index in rng.permutation(len(passages))[:count].tolist():
        document, passage = passages[index]
        options = [tokenizer.decode(passage[context_tokens:])]
        others = rng.permutation(len(passages)).tolist()
        others = [i for i in others if passages[i][0] != document] + \
                 [i for i in others if passages[i][0] == document and i != index]
        for other in others:
            if len(options) == choices:
                break
            text = tokenizer.decode(passages[other][1][context_tokens:])
            if text and text not in options:
                options.append(text)
        if len(options) < choices:
            continue  # too few distinct spans for this passage
        order = rng.permutation(choices).tolist()
        records.append({"context": tokenizer.decode(passage[:context_tokens]),
                        "choices": [options[i] for i in order], "label": order.index(0)})
    return records
