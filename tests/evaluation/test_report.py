"""The report's plots and notes: curves per family of the sweep with the main methods as points, and a
note on every row a reader would otherwise wonder about."""

from __future__ import annotations

from tpkit.evaluation.report import curve_data, report_notes


def _row(family, accuracy, fraction, k1=10.0, budget=None, **extra):
    return {"family": family, "accuracy": accuracy, "budget": budget,
            "tokens": {"fraction": {"mean": fraction}, "k1": {"mean": k1}}, **extra}  # fmt: skip


METHODS = {
    "dense": _row("dense", 0.98, 1.0, 144.0),
    "ours": _row("ours", 0.62, 0.216, 31.2),
    "fastv": _row(
        "fastv",
        0.42,
        0.399,
        144.0,
        budget_gap_tokens=44.0,
        named_objects={"stage1": {"kept_patches": 144.0}, "stage2": {"kept_patches": 0.0}},
    ),  # fmt: skip
    "ours@0.5": _row("ours", 0.89, 0.5, 99.8, 0.5, budget_gap_tokens=0.2),
    "ours@0.22": _row("ours", 0.30, 0.220, 14.1, 0.22),
    "ours@0.15": _row("ours", 0.14, 0.15, 4.0, 0.15),
    "random@0.22": _row("random", 0.25, 0.220, 14.1, 0.22),
}


def test_the_sweep_is_a_sorted_curve_and_the_main_run_a_point():
    """ours at 21.6% is not a point of the sweep: joined to ours@0.22 (22.0%) it drew a zigzag."""
    data = curve_data(METHODS, "accuracy")
    assert data["ours"]["curve"] == [
        (0.15, 0.14, "ours@0.15"),
        (0.22, 0.30, "ours@0.22"),
        (0.5, 0.89, "ours@0.5"),
    ]
    assert data["ours"]["points"] == [(0.216, 0.62, "ours")]
    assert data["dense"] == {"curve": [], "points": [(1.0, 0.98, "dense")]}
    assert data["random"]["points"] == [] and len(data["random"]["curve"]) == 1


def test_each_oddity_gets_a_note():
    notes = report_notes({"methods": METHODS, "notes": ["x left out: because"]})
    assert notes[0] == "x left out: because"
    assert notes[1] == (
        "`fastv` reaches 39.9% of the token-layers, not ours' 21.6%: up to 44.0 tokens per layer off "
        "(budget_gap_tokens in results.json): the budget is below the least it keeps"
    )
    assert notes[2].startswith("`fastv` keeps no image patch after stage 2 (patches after stage 2: 0.0)")
    assert notes[3].startswith("`FAMILY@F` rows are the budget sweep") and notes[3].endswith(
        "(ours: k1 31.2 at 21.6%; ours@0.22: k1 14.1 at 22.0%). The plots draw the sweep as lines and the "
        "main rows as points"
    )
    assert len(notes) == 4  # ours@0.5 misses by 0.2 tokens per layer: nothing to say
