"""Quality metrics and token accounting for evaluation runs.

Answers are compared after :func:`normalize_answer` (lowercase, punctuation and articles removed,
number words turned into digits), the usual VQA-style normalisation. Aggregation uses torchmetrics:
exact match is a :class:`~torchmetrics.aggregation.MeanMetric` over per-sample hits, yes/no questions
are a binary classification with "yes" as the positive class (POPE), scored by torchmetrics' binary
accuracy / precision / recall / F1.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch

__all__ = [
    "normalize_answer",
    "exact_match",
    "accuracy_report",
    "yes_no_label",
    "yes_no_report",
    "agreement",
    "token_summary",
]

_NUMBER_WORDS = {
    "zero": "0",
    "none": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, map number words to digits, squeeze spaces.

    ``"The  Two."`` -> ``"2"``, ``"a red circle!"`` -> ``"red circle"``. Decimal points and
    thousands commas inside numbers survive (``"3.5"``, ``"1,000"`` -> ``"1000"``).
    """
    text = text.lower().strip()
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,000 -> 1000
    text = re.sub(r"(?<=\d)\.(?=\d)", "\0", text)  # keep decimal points through the punctuation strip
    text = _PUNCT.sub(" ", text).replace("\0", ".")
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> list[bool]:
    """Per-sample exact match after normalisation."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]


def first_word_match(predictions: Sequence[str], references: Sequence[str]) -> list[bool]:
    """Per-sample match of the first normalised word: the answer was right, whether or not the model
    then stopped (a pruned model that says "no circle, green ..." for "no" counts here, not in
    ``exact_match``)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    first = [(normalize_answer(p).split() or [None])[0] for p in predictions]
    return [
        f is not None and f == (normalize_answer(r).split() or [""])[0] for f, r in zip(first, references)
    ]


def _mean(hits: Sequence[bool]) -> float:
    from torchmetrics.aggregation import MeanMetric  # lazily: speed-only runs need no torchmetrics

    if not hits:
        return float("nan")
    m = MeanMetric()
    m.update(torch.tensor([float(h) for h in hits]))
    return float(m.compute())


def accuracy_report(
    predictions: Sequence[str], references: Sequence[str], qtypes: Sequence[str | None] | None = None
) -> dict:
    """``{"accuracy", "first_word_accuracy", "n", "by_qtype": {qtype: {...the same}}}``.

    ``accuracy`` is exact match after normalisation; ``first_word_accuracy`` compares first words only
    (:func:`first_word_match`).
    """
    hits = exact_match(predictions, references)
    first = first_word_match(predictions, references)
    out: dict = {"accuracy": _mean(hits), "first_word_accuracy": _mean(first), "n": len(hits), "by_qtype": {}}
    if qtypes is not None:
        groups: dict[str, list[tuple[bool, bool]]] = {}
        for h, f, q in zip(hits, first, qtypes):
            groups.setdefault(q or "other", []).append((h, f))
        out["by_qtype"] = {
            q: {
                "accuracy": _mean([h for h, _ in v]),
                "first_word_accuracy": _mean([f for _, f in v]),
                "n": len(v),
            }
            for q, v in sorted(groups.items())
        }
    return out


def yes_no_label(text: str) -> int | None:
    """1 for a yes, 0 for a no, None when the text is neither (first normalised word decides)."""
    words = normalize_answer(text).split()
    if not words:
        return None
    if words[0] in ("yes", "true"):
        return 1
    if words[0] in ("no", "not", "false"):
        return 0
    return None


def yes_no_report(predictions: Sequence[str], references: Sequence[str]) -> dict | None:
    """POPE-style binary scores on the samples whose reference is yes/no ("yes" = positive).

    A prediction that is neither yes nor no counts as "no" (as POPE does); ``unparsed`` says how
    often that happened. Returns None when no reference is a yes/no answer.
    """
    pairs = [(yes_no_label(p), yes_no_label(r)) for p, r in zip(predictions, references)]
    from torchmetrics.classification import BinaryAccuracy, BinaryF1Score, BinaryPrecision, BinaryRecall

    pairs = [(p, r) for p, r in pairs if r is not None]
    if not pairs:
        return None
    unparsed = sum(p is None for p, _ in pairs)
    preds = torch.tensor([p if p is not None else 0 for p, _ in pairs])
    target = torch.tensor([r for _, r in pairs])
    scores = {}
    for name, metric in (
        ("accuracy", BinaryAccuracy()),
        ("precision", BinaryPrecision()),
        ("recall", BinaryRecall()),
        ("f1", BinaryF1Score()),
    ):
        scores[name] = float(metric(preds, target))
    scores["yes_ratio"] = float(preds.float().mean())
    scores["n"] = len(pairs)
    scores["unparsed"] = unparsed
    return scores


def agreement(predictions: Sequence[str], dense_predictions: Sequence[str]) -> float:
    """Fraction of samples whose normalised answer equals the dense model's."""
    return _mean(exact_match(predictions, dense_predictions))


def token_summary(values: torch.Tensor | Sequence[float]) -> dict:
    """Mean and p10/p50/p90 of per-sample values (kept counts, token-layer fractions)."""
    v = torch.as_tensor(values).detach().to("cpu", torch.float64).flatten()
    if v.numel() == 0:
        return {"mean": float("nan"), "p10": float("nan"), "p50": float("nan"), "p90": float("nan")}
    q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"mean": float(v.mean()), "p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2])}
