"""Zero-shot multiple choice (PanGu-α style) and cloze, scored by the model's loss.

* Multiple choice ``{"context": C, "choices": [...], "label": i}``: each choice is scored by the
  negative log-likelihood of its tokens after the context's tokens; the prediction is the lowest,
  raw (``none``), per token (``tokens``) or per character of the choice (``chars``).
* Cloze ``{"context": C, "answer": A}``: right when the model's greedy continuation of C is A, which
  is when every token of A is the argmax given the context and A's earlier tokens.

Contexts too long for the window lose their oldest tokens.  Accuracy comes with a Wilson 95%
interval and, for multiple choice, the chance level (the mean of 1 / number of choices).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from mindformers_sigma.errors import DataError
from mindformers_sigma.eval.scoring import TokenLogProbs, score_rows
from mindformers_sigma.tokenizer.kinds import AnyTokenizer

NORMS = ("none", "tokens", "chars")
MAX_TASK_BYTES = 256 * 2 ** 20


@dataclass
class Record:
    where: str  # FILE:LINE
    context: str
    choices: Optional[List[str]]  # None: cloze
    label: Optional[int]
    answer: Optional[str]


def _record(raw: object, where: str) -> Record:
    def bad(problem: str) -> DataError:
        return DataError(f"{where}: {problem}")

    if not isinstance(raw, dict):
        raise bad("expected a JSON object with context and choices/label (or answer)")
    context = raw.get("context")
    if not isinstance(context, str):
        raise bad("context: missing or not a string")
    if "answer" in raw:
        if "choices" in raw or "label" in raw:
            raise bad("give choices and label (multiple choice) or answer (cloze), not both")
        if not isinstance(raw["answer"], str) or not raw["answer"]:
            raise bad("answer: must be a non-empty string")
        return Record(where, context, None, None, raw["answer"])
    choices, label = raw.get("choices"), raw.get("label")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise bad("choices: must be a list of at least 2 non-empty strings (or give answer for a cloze record)")
    if len(set(choices)) < len(choices):
        raise bad("choices: two are the same text, so the record cannot tell them apart; make them distinct")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise bad(f"label: must be an integer in [0, {len(choices) - 1}], the index of the right choice")
    return Record(where, context, choices, label, None)


def read_task(path: str) -> List[Record]:
    """The records of a .jsonl task file; a bad line is one error naming the file and the line."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_TASK_BYTES + 1)
    except OSError as err:
        raise DataError(f"--task {path}: cannot read it ({err.strerror})") from None
    if len(data) > MAX_TASK_BYTES:
        raise DataError(f"--task {path}: larger than {MAX_TASK_BYTES >> 20} MiB; split it")
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # a UTF-8 byte-order mark
    records = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            raw = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg})") from None
        records.append(_record(raw, where))
    if not records:
        raise DataError(f"--task {path}: holds no record; one JSON object per line")
    return records


@dataclass
class ZeroShotResult:
    records: int
    correct: int
    chance: Optional[float]
    predictions: List[int]  # per record: the chosen index (multiple choice) or 1/0 (cloze right or not)

    @property
    def accuracy(self) -> float:
        return self.correct / self.records

    def interval(self, z: float = 1.959964) -> tuple:
        """Wilson score interval for the accuracy."""
        n, p = self.records, self.accuracy
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def as_dict(self) -> dict:
        low, high = self.interval()
        return {"records": self.records, "correct": self.correct, "accuracy": self.accuracy,
                "ci95": [low, high], "chance": self.chance}


def continuation_rows(tokenizer: AnyTokenizer, context: str, continuation: str, seq_length: int, where: str):
    """(row tokens, number of continuation tokens): context then continuation, the context cut from the left to fit."""
    context_ids, continuation_ids = tokenizer.encode(context), tokenizer.encode(continuation)
    if not continuation_ids:
        raise DataError(f"{where}: a choice or answer tokenizes to nothing")
    if len(continuation_ids) >= seq_length:
        raise DataError(f"{where}: a choice or answer is {len(continuation_ids)} tokens; the model's window is "
                        f"{seq_length}; shorten it")
    room = seq_length + 1 - len(continuation_ids)
    context_ids = context_ids[-room:] if context_ids else []
    if not context_ids:
        context_ids = [tokenizer.eod_id]  # no context: condition on a document boundary
    return context_ids + continuation_ids, len(continuation_ids)


def evaluate(scorer: TokenLogProbs, tokenizer: AnyTokenizer, records: List[Record], domain_id: int, seq_length: int,
             norm: str, batch_size: int) -> ZeroShotResult:
    rows, spans, owners = [], [], []
    for index, record in enumerate(records):
        for text in record.choices if record.choices is not None else [record.answer]:
            row, span = continuation_rows(tokenizer, record.context, text, seq_length, record.where)
            rows.append(row)
            spans.append((span, len(text)))
            owners.append(index)
    scored = score_rows(scorer, rows, [domain_id] * len(rows), seq_length, batch_size)
    per_record: List[list] = [[] for _ in records]
    for owner, (span, chars), (log_probs, greedy) in zip(owners, spans, scored):
        nll = -float(log_probs[-span:].sum())
        divisor = {"none": 1.0, "tokens": float(span), "chars": float(max(chars, 1))}[norm]
        per_record[owner].append((nll / divisor, bool(greedy[-span:].all())))
    predictions, correct = [], 0
    for record, scores in zip(records, per_record):
        if record.choices is None:
            right = scores[0][1]
            predictions.append(int(right))
        else:
            choice = int(np.argmin([score for score, _ in scores]))
            predictions.append(choice)
            right = choice == record.label
        correct += int(right)
    multiple = [len(r.choices) for r in records if r.choices is not None]
    chance = float(np.mean([1.0 / k for k in multiple])) if multiple else None
    return ZeroShotResult(len(records), correct, chance, predictions)
