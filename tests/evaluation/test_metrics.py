"""Metric functions on hand-made cases (exact numbers)."""

from __future__ import annotations

import math

import pytest
import torch

from tpkit.evaluation import metrics


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("The  Two.", "2"),
        ("a red circle!", "red circle"),
        ("Yes", "yes"),
        ("  NO, it is not ", "no it is not"),
        ("three", "3"),
        ("1,000 apples", "1000 apples"),
        ("3.5", "3.5"),
        ("top-left", "top left"),
        ("An eleven", "11"),
    ],
)
def test_normalize_answer(raw, norm):
    assert metrics.normalize_answer(raw) == norm


def test_exact_match_and_accuracy_by_qtype():
    preds = ["Red.", "two", "yes", "blue", "the circle"]
    refs = ["red", "2", "no", "blue", "a circle"]
    qtypes = ["color", "count", "exist", "color", "shape"]
    assert metrics.exact_match(preds, refs) == [True, True, False, True, True]
    rep = metrics.accuracy_report(preds, refs, qtypes)
    assert rep["accuracy"] == pytest.approx(0.8)
    assert rep["n"] == 5
    assert rep["by_qtype"] == {
        "color": {"accuracy": 1.0, "first_word_accuracy": 1.0, "n": 2},
        "count": {"accuracy": 1.0, "first_word_accuracy": 1.0, "n": 1},
        "exist": {"accuracy": 0.0, "first_word_accuracy": 0.0, "n": 1},
        "shape": {"accuracy": 1.0, "first_word_accuracy": 1.0, "n": 1},
    }
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        metrics.exact_match(["a", "b"], ["a"])


def test_first_word_match_counts_answers_that_do_not_stop():
    preds = ["no circle, green cross,", "Yes.", "", "left of it", "two"]
    refs = ["no", "yes", "no", "right", "2"]
    assert metrics.first_word_match(preds, refs) == [True, True, False, False, True]
    assert metrics.exact_match(preds, refs) == [False, True, False, False, True]
    rep = metrics.accuracy_report(preds, refs)
    assert rep["accuracy"] == pytest.approx(0.4) and rep["first_word_accuracy"] == pytest.approx(0.6)


def test_yes_no_report_pope_style():
    # references: 4 yes, 3 no (+ one non-yes/no reference that is ignored)
    refs = ["yes", "yes", "yes", "yes", "no", "no", "no", "red"]
    preds = ["Yes.", "yes, there is", "no", "maybe", "yes", "No", "no", "red"]
    # "maybe" is unparsed -> counted as "no". TP=2 FN=2 FP=1 TN=2
    r = metrics.yes_no_report(preds, refs)
    assert r["n"] == 7 and r["unparsed"] == 1
    assert r["accuracy"] == pytest.approx(4 / 7)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(2 / 4)
    assert r["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert r["yes_ratio"] == pytest.approx(3 / 7)
    assert metrics.yes_no_report(["red"], ["blue"]) is None


def test_yes_no_label():
    assert metrics.yes_no_label("Yes, it is") == 1
    assert metrics.yes_no_label("No.") == 0
    assert metrics.yes_no_label("There is a cat") is None
    assert metrics.yes_no_label("") is None


def test_agreement():
    assert metrics.agreement(["Red", "2", "x"], ["red.", "two", "y"]) == pytest.approx(2 / 3)
    assert math.isnan(metrics.agreement([], []))


def test_token_summary():
    s = metrics.token_summary(torch.arange(11))  # 0..10
    assert s == {"mean": 5.0, "p10": 1.0, "p50": 5.0, "p90": 9.0}
    assert math.isnan(metrics.token_summary([])["mean"])
