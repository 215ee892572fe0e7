"""Evaluation report: ``results.json``, a Markdown table, PNG plots and a kept-patch grid.

Files written into the run's output directory:

- ``results.json`` — config, dataset, and per method: accuracy (overall, per question type),
  yes/no scores, agreement with dense, token accounting, FLOPs, speed.
- ``results.md`` — what was run (model, adapter, data, device, date, version), one row per method
  (the table printed at the end of ``evaluate.py``), and notes on the rows that need one.
- ``accuracy_vs_tokens.png`` — accuracy against token-layer fraction: a curve per family of the
  budget sweep, and the main methods as points.
- ``speedup_vs_tokens.png`` — prefill speedup over dense against token-layer fraction.
- ``kept_patches.png`` — the first samples with the patches kept by stage 1 and by both stages.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "TABLE_COLUMNS",
    "SPEED_COLUMNS",
    "RETENTION_COLUMNS",
    "markdown_table",
    "summary_table",
    "speed_markdown",
    "timing_spread",
    "spread_note",
    "random_init_summary",
    "retention_table",
    "qtype_table",
    "parse_markdown_table",
    "write_json",
    "curve_data",
    "plot_curves",
    "run_header",
    "report_notes",
    "plot_kept_patches",
    "write_report",
    "overlay_samples",
]

TABLE_COLUMNS = (
    "method",
    "accuracy",
    "% of dense",
    "first word right",
    "agree w/ dense",
    "yes/no F1",
    "k1 (mean)",
    "k2 (mean)",
    "token-layer frac.",
    "prefill ms",
    "prefill speedup",
    "GFLOPs (LM prefill)",
    "FLOPs vs dense",
)


def _fmt(x, spec: str = ".3f", pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if pct:
        return f"{100 * x:.1f}%"
    return format(x, spec)


def _row(name: str, r: dict) -> list[str]:
    tok = r.get("tokens", {})
    speed = r.get("speed") or {}
    yn = r.get("yes_no") or {}
    flops = r.get("flops") or {}
    return [
        name,
        _fmt(r.get("accuracy")),
        _fmt(r.get("relative_accuracy"), pct=True),
        _fmt(r.get("first_word_accuracy")),
        _fmt(r.get("agreement"), pct=True),
        _fmt(yn.get("f1")),
        _fmt(tok.get("k1", {}).get("mean"), ".1f"),
        _fmt(tok.get("k2", {}).get("mean"), ".1f"),
        _fmt(tok.get("fraction", {}).get("mean"), pct=True),
        _fmt(speed.get("prefill", {}).get("median_ms"), ".1f"),
        _fmt(speed.get("prefill_speedup"), ".2f") + ("×" if speed.get("prefill_speedup") else ""),
        _fmt(flops.get("gflops"), ".2f"),
        _fmt(flops.get("relative"), pct=True),
    ]


def markdown_table(methods: dict[str, dict]) -> str:
    """GitHub Markdown table, one row per method (in ``methods``' order)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    for name, r in methods.items():
        lines.append("| " + " | ".join(_row(name, r)) + " |")
    return "\n".join(lines) + "\n"


def summary_table(rows: Sequence[tuple[str, dict]], dense_accuracy: float | None) -> str:
    """The short table of a comparison (the demo's): accuracy, share of dense, first word right,
    token-layer fraction, prefill speedup and accuracy per question type, one row per (label, result)."""
    qtypes = sorted({q for _, r in rows for q in r.get("by_qtype", {})})
    cols = [
        "method",
        "accuracy",
        "% of dense",
        "first word right",
        "token-layer frac.",
        "prefill speedup",
        *qtypes,
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for label, r in rows:
        frac = r.get("tokens", {}).get("fraction", {}).get("mean")
        speed = (r.get("speed") or {}).get("prefill_speedup")
        by = r.get("by_qtype", {})
        cells = [
            label,
            f"{r['accuracy']:.3f}",
            f"{100 * r['accuracy'] / dense_accuracy:.1f}%" if dense_accuracy else "–",
            f"{r['first_word_accuracy']:.3f}" if r.get("first_word_accuracy") is not None else "–",
            f"{100 * frac:.1f}%" if frac is not None else "–",
            f"{speed:.2f}×" if speed else "–",
        ] + [f"{by[q]['accuracy']:.3f}" if q in by else "–" for q in qtypes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def qtype_table(methods: dict[str, dict]) -> str:
    """Accuracy per question type (columns) for each method (rows); "" when there are no types."""
    qtypes = sorted({q for r in methods.values() for q in r.get("by_qtype", {})})
    if not qtypes:
        return ""
    cols = ["method"] + [
        f"{q} (n={next(iter(methods.values()))['by_qtype'].get(q, {}).get('n', '?')})" for q in qtypes
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for name, r in methods.items():
        cells = [_fmt(r.get("by_qtype", {}).get(q, {}).get("accuracy")) for q in qtypes]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines) + "\n"


RETENTION_COLUMNS = (
    "method",
    "named objects kept, stage 1",
    "random, same count",
    "after stage 2",
    "random, same count (of stage 1's)",
    "patches after stage 2",
)


def retention_table(methods: dict[str, dict]) -> str:
    """Share of samples whose question-named objects all keep a patch (synthetic data); "" if none.

    One row per method with ``named_objects`` (sweep points left out), each stage beside a random
    choice of as many patches from the same pool (``tpkit.evaluation.retention``).
    """
    rows = []
    for name, r in methods.items():
        no = r.get("named_objects")
        if not no or "@" in name or not no.get("stage1"):
            continue
        s1, s2 = no["stage1"], no.get("stage2") or {}
        rows.append(
            [
                name,
                _fmt(s1.get("all_kept")),
                _fmt(s1.get("random_all_kept")),
                _fmt(s2.get("all_kept")),
                _fmt(s2.get("random_all_kept")),
                _fmt(s2.get("kept_patches"), ".1f"),
            ]
        )
    if not rows:
        return ""
    cols = RETENTION_COLUMNS
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in rows]) + "\n"


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """Rows of the first Markdown table in ``text`` as ``{column: cell}`` (for tests and tools)."""
    rows: list[str] = []
    for ln in text.splitlines():
        if ln.strip().startswith("|"):
            rows.append(ln.strip())
        elif rows:  # the first table ended
            break
    if len(rows) < 2:
        raise ValueError("no Markdown table found")
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    header, sep, body = cells[0], cells[1], cells[2:]
    if not all(set(c) <= set("-: ") and c for c in sep):
        raise ValueError(f"second table line is not a separator: {rows[1]}")
    out = []
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise ValueError(f"row {i + 1} has {len(r)} cells, header has {len(header)}")
        out.append(dict(zip(header, r)))
    return out


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def write_json(obj: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2))
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_data(methods: dict[str, dict], key: str) -> dict[str, dict[str, list[tuple[float, float, str]]]]:
    """Per family, the points of ``key`` (``accuracy`` or ``prefill_speedup``) against the mean
    token-layer fraction, as (x, y, method): ``curve`` the budget sweep's runs (``family@F``) sorted
    by x, ``points`` the family's other runs (its main method, e.g. ``ours``: counts of its own
    choosing, not a point of the sweep, so not joined to it)."""
    out: dict[str, dict[str, list[tuple[float, float, str]]]] = {}
    for name, r in methods.items():
        y = r.get("speed", {}).get("prefill_speedup") if key == "prefill_speedup" else r.get(key)
        x = r.get("tokens", {}).get("fraction", {}).get("mean")
        if y is None or x is None or (isinstance(y, float) and math.isnan(y)):
            continue
        fam = out.setdefault(r.get("family", name), {"curve": [], "points": []})
        fam["curve" if "@" in name else "points"].append((float(x), float(y), name))
    for fam in out.values():
        fam["curve"].sort()
    return out


def plot_curves(methods: dict[str, dict], key: str, ylabel: str, path: str | Path, title: str) -> Path | None:
    """``key`` (``accuracy`` or ``prefill_speedup``) against mean token-layer fraction
    (:func:`curve_data`): a line per family of the budget sweep, a marker per main method."""
    data = curve_data(methods, key)
    if not data:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    colors = plt.get_cmap("tab10").colors
    for i, (fam, d) in enumerate(data.items()):
        color = colors[i % len(colors)]
        if d["curve"]:
            xs, ys = [p[0] for p in d["curve"]], [p[1] for p in d["curve"]]
            ax.plot(xs, ys, marker="o", ms=4, lw=1.2, color=color, alpha=0.8, label=f"{fam}@F (sweep)")
        if not d["points"]:
            continue
        xs, ys = [p[0] for p in d["points"]], [p[1] for p in d["points"]]
        if fam == "dense":
            ax.scatter(xs, ys, marker="*", s=160, color="black", zorder=5, label="dense")
        elif fam == "variant":  # eval.variants: single runs of ours with settings changed
            ax.scatter(xs, ys, marker="x", s=40, color="gray", zorder=4, label="ours variants")
        else:
            ax.scatter(xs, ys, marker="D", s=55, color=color, edgecolor="black", zorder=5, label=fam)
    ax.set_xlabel("token-layer fraction (Σ tokens seen / (L · n_dense))")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _overlay(image: np.ndarray, grid: int, keep: torch.Tensor, keep2: torch.Tensor | None) -> np.ndarray:
    """Dim patches dropped by stage 1 (dark) and by stage 2 (blue tint); kept ones stay as they are."""
    h, w = image.shape[:2]
    m1 = np.zeros(grid * grid, dtype=bool)
    m1[keep.long().cpu().numpy()] = True
    lvl = np.where(m1, 2, 0)
    if keep2 is not None:
        m2 = np.zeros(grid * grid, dtype=bool)
        m2[keep2.long().cpu().numpy()] = True
        lvl = np.where(m1 & ~m2, 1, lvl)
    lvl = lvl.reshape(grid, grid)
    lvl = np.kron(lvl, np.ones((math.ceil(h / grid), math.ceil(w / grid)), dtype=lvl.dtype))[:h, :w]
    out = image.copy()
    out[lvl == 0] *= 0.18
    tint = np.array([0.25, 0.35, 1.0])
    out[lvl == 1] = 0.45 * out[lvl == 1] + 0.25 * tint
    return out.clip(0, 1)


def plot_kept_patches(samples: Sequence[dict], path: str | Path) -> Path | None:
    """Grid image: for each sample (``image`` HxWx3 in [0, 1], ``visual_keep``, optional
    ``stage2_visual_keep``, ``grid`` patches per side, ``title``) the input, stage-1 kept patches,
    and patches kept by both stages."""
    if not samples:
        return None
    plt = _plt()
    n = len(samples)
    fig, axes = plt.subplots(3, n, figsize=(2.0 * n, 6.6), dpi=100, squeeze=False)
    for j, s in enumerate(samples):
        img, g = s["image"], s["grid"]
        k1 = len(s["visual_keep"])
        panels = [
            (img, s.get("title", "")),
            (_overlay(img, g, s["visual_keep"], None), f"stage 1: {k1}/{g * g}"),
        ]
        keep2 = s.get("stage2_visual_keep")
        if keep2 is not None:
            panels.append((_overlay(img, g, s["visual_keep"], keep2), f"stages 1+2: {len(keep2)}/{g * g}"))
        else:
            panels.append((None, "no stage 2"))
        for i, (im, t) in enumerate(panels):
            ax = axes[i][j]
            ax.axis("off")
            if im is not None:
                ax.imshow(im, interpolation="nearest")
            ax.set_title(t, fontsize=7)
    fig.suptitle("kept patches (dark: dropped by stage 1, blue: dropped by stage 2)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_header(results: dict) -> str:
    """The block that opens results.md: what was evaluated, on what data, where, when, with what."""
    m, d, run = results.get("model") or {}, results.get("dataset") or {}, results.get("run") or {}
    adapter = "none"
    if m.get("adapter"):
        step = f" (step {m['adapter_step']})" if m.get("adapter_step") is not None else ""
        adapter = f"`{m['adapter']}`{step}; `dense` is the base model without it"
    limit = d.get("limit")
    skipped = f", {d['n_skipped']} skipped" if d.get("n_skipped") else ""
    samples = f"{d.get('n')} samples of {d.get('n_records')} records" + (
        f" (eval.limit: {limit})" if limit is not None else ""
    )
    lines = [
        "# Evaluation",
        "",
        f"- model: `{m.get('path')}` ({m.get('dtype', '?')}, {m.get('attn_implementation', '?')}), "
        f"{m.get('num_layers')} language-model layers",
        f"- adapter: {adapter}",
        f"- data: `{d.get('path')}`: {samples}{skipped}",
        f"- device: {run.get('device', results.get('device'))} ({run.get('device_name', '?')})"
        + (f"; timed with {run['timing_threads']} torch thread(s)" if run.get("timing_threads") else ""),
        f"- run: {run.get('date', '?')}, tpkit {run.get('tpkit', '?')}, torch {run.get('torch', '?')}, "
        f"transformers {run.get('transformers', '?')}",
    ]
    return "\n".join(lines) + "\n"


def report_notes(results: dict) -> list[str]:
    """What the tables would leave a reader to wonder about, one sentence each: methods left out,
    budgets a method cannot reach, a method that keeps no patch after stage 2, how the sweep's rows
    differ from the main ones, noisy timings."""
    methods = results.get("methods", {})
    notes = list(results.get("notes") or [])
    ours = methods.get("ours")
    frac = lambda r: r.get("tokens", {}).get("fraction", {}).get("mean")  # noqa: E731
    for name, r in methods.items():
        gap = r.get("budget_gap_tokens")
        if gap is not None and gap > 1.0:
            target = f"{r['budget']:.0%}" if r.get("budget") is not None else f"ours' {frac(ours):.1%}"
            notes.append(
                f"`{name}` reaches {frac(r):.1%} of the token-layers, not {target}: up to {gap:.1f} tokens per "
                "layer off (budget_gap_tokens in results.json): the budget is below the least it keeps"
            )
        patches = ((r.get("named_objects") or {}).get("stage2") or {}).get("kept_patches")
        if patches == 0 and "@" not in name:
            notes.append(
                f"`{name}` keeps no image patch after stage 2 (patches after stage 2: 0.0): at its budget the "
                "layers from its stage-2 layer on have room only for the text it never drops"
            )
    sweep = [n for n in methods if n.startswith("ours@")]
    if ours and sweep:
        near = min(sweep, key=lambda n: abs((frac(methods[n]) or 0) - (frac(ours) or 0)))
        k1 = lambda r: r.get("tokens", {}).get("k1", {}).get("mean")  # noqa: E731
        notes.append(
            f"`FAMILY@F` rows are the budget sweep: every sample at token-layer fraction F, stage 1 given "
            "eval.sweep_stage1_factor x F of the prompt (less where the stage-2 layer does not allow it, never "
            "fewer patches than stage1.min_keep) and stage 2 the rest; the main rows keep what their own rules "
            f"choose, so the two differ at one fraction (ours: k1 {k1(ours):.1f} at {frac(ours):.1%}; "
            f"{near}: k1 {k1(methods[near]):.1f} at {frac(methods[near]):.1%}). The plots draw the sweep as "
            "lines and the main rows as points"
        )
    speeds = {n: r["speed"] for n, r in methods.items() if r.get("speed")}
    if note := spread_note(speeds):
        notes.append(note[0].upper() + note[1:])
    return notes


def write_report(results: dict, out_dir: str | Path, grid_samples: Sequence[dict] | None = None) -> dict:
    """Write results.json, results.md and the plots; returns ``{kind: path}`` of the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    methods = results.get("methods", {})
    table = markdown_table(methods)
    per_type = qtype_table(methods)
    kept = retention_table(methods)
    adapter = (results.get("model") or {}).get("adapter")
    notes = report_notes(results)
    (out / "results.md").write_text(
        run_header(results)
        + "\n"
        + table
        + (
            f"\n`dense` is the base model without the adapter, unpruned; the other rows run the base model"
            f" with the adapter `{adapter}` merged in.\n"
            if adapter
            else ""
        )
        + ("\nNotes:\n\n" + "".join(f"- {n}.\n" for n in notes) if notes else "")
        + ("\nAccuracy by question type:\n\n" + per_type if per_type else "")
        + (
            "\nObjects the question names (synthetic data): share of samples in which every one keeps"
            " a patch, beside a random choice of as many patches from the same pool:\n\n" + kept
            if kept
            else ""
        )
    )
    files["table"] = str(out / "results.md")
    p = plot_curves(
        methods, "accuracy", "exact-match accuracy", out / "accuracy_vs_tokens.png", "accuracy vs tokens"
    )
    if p:
        files["accuracy_plot"] = str(p)
    p = plot_curves(
        methods,
        "prefill_speedup",
        "prefill speedup over dense (×)",
        out / "speedup_vs_tokens.png",
        "prefill speedup",
    )
    if p:
        files["speedup_plot"] = str(p)
    if grid_samples:
        p = plot_kept_patches(grid_samples, out / "kept_patches.png")
        if p:
            files["kept_patches"] = str(p)
    results = dict(results, files=files, notes=notes)
    write_json(results, out / "results.json")
    files["json"] = str(out / "results.json")
    return files


SPEED_COLUMNS = (
    "method",
    "prefill median ms",
    "prefill p90 ms",
    "samples/s",
    "TTFT ms",
    "decode tok/s",
    "peak MiB",
    "prefill speedup",
    "TTFT speedup",
    "decode speedup",
)


def speed_markdown(speeds: dict[str, dict]) -> str:
    """Markdown table of :func:`tpkit.evaluation.speed.speed_table` results."""
    lines = ["| " + " | ".join(SPEED_COLUMNS) + " |", "|" + "|".join("---" for _ in SPEED_COLUMNS) + "|"]
    for name, r in speeds.items():
        cells = [
            name,
            _fmt(r["prefill"]["median_ms"], ".1f"),
            _fmt(r["prefill"]["p90_ms"], ".1f"),
            _fmt(r.get("samples_per_s"), ".1f"),
            _fmt(r.get("ttft_ms"), ".1f"),
            _fmt(r.get("decode_tokens_per_s"), ".1f"),
            _fmt(r.get("peak_memory_mb"), ".0f"),
            _fmt(r.get("prefill_speedup"), ".2f"),
            _fmt(r.get("ttft_speedup"), ".2f"),
            _fmt(r.get("decode_speedup"), ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# p90 / median of a method's timed rounds above which the report says its timings are noisy
NOISY_SPREAD = 1.2


def timing_spread(speeds: dict[str, dict]) -> tuple[float, str]:
    """The largest p90 / median over every timed quantity (prefill, time to first token, decoding) of
    :func:`tpkit.evaluation.speed.speed_table` results -> (ratio, "method quantity")."""
    worst = (1.0, "")
    for name, r in speeds.items():
        pairs = [("prefill", r["prefill"]["median_ms"], r["prefill"]["p90_ms"])]
        pairs += [(q, r.get(f"{q}_ms"), r.get(f"{q}_p90_ms")) for q in ("ttft", "decode")]
        for what, median, p90 in pairs:
            if median and p90 and p90 / median > worst[0]:
                worst = (p90 / median, f"{name} {what}")
    return worst


def spread_note(speeds: dict[str, dict], threshold: float = NOISY_SPREAD) -> str | None:
    """A note when the timings are noisy (see :func:`timing_spread`), else None."""
    ratio, where = timing_spread(speeds)
    if ratio <= threshold:
        return None
    return (
        f"timings are noisy: p90 / median up to {ratio:.2f} ({where}), so the speedups (ratios of medians) "
        "may be off; time on an idle machine, or with more speed.repeats"
    )


def random_init_summary(results: dict) -> str:
    """What ``tpkit evaluate --random-init`` prints: the speed table, the run, the measured prefill
    speedup beside the FLOPs ratio, and a note when the timings are noisy."""
    speeds = results["speed"]
    ours = next(n for n in speeds if n != "dense")
    ach = results["achieved"].get("token_layer_fraction", {}).get("mean")
    scale = f", widths / {results['scale_down']}" if results.get("scale_down", 1) > 1 else ""
    lines = [
        speed_markdown(speeds),
        f"{results['architecture']} (random init{scale}, {results['device_name']}, {results['dtype']}, batch "
        f"{results['batch_size']}, {results['threads']} thread(s), median of {results['repeats']} rounds, "
        f"{results['prompt']['n_dense']} tokens): k1={results['counts']['k1']} k2={results['counts']['k2']} "
        f"token-layer fraction {'–' if ach is None else f'{ach:.4f}'}",
        f"{ours} vs dense: prefill {results['prefill_speedup']:.2f}x measured; the language model's prefill "
        f"FLOPs {results['flops_ratio']:.2f}x fewer",
    ]
    if results.get("vision_ms") is not None:  # the visual encoder is the same work for both
        dense_ms = speeds["dense"]["prefill"]["median_ms"]
        lm = results.get("lm_prefill_speedup")
        lines.append(
            f"the visual encoder alone: {results['vision_ms']:.1f} ms of dense's {dense_ms:.1f} ms prefill"
            + (
                f"; without it, ours' language-model prefill is {lm:.2f}x faster"
                if lm
                else "; what is left of ours' prefill is within the timing noise (no language-model ratio)"
            )
        )
    if note := spread_note(speeds):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def overlay_samples(run: dict, processor, first: dict, n: int) -> list[dict]:
    """The first ``n`` images as the model saw them (``first``: a batch; pixel_values un-normalised) with
    the patches a run kept, for :func:`plot_kept_patches`."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1)
    px = first["pixel_values"][:n].float().cpu()
    side = px.shape[-1]
    patch = getattr(processor, "patch_size", None) or 14
    out = []
    for i in range(min(n, px.shape[0], len(run["visual_keep"]))):
        if run["visual_keep"][i] is None:
            break
        img = (px[i] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        out.append(
            {
                "image": img,
                "grid": side // patch,
                "visual_keep": run["visual_keep"][i],
                "stage2_visual_keep": run["stage2_visual_keep"][i],
                "title": f"{run['references'][i]} -> {run['answers'][i]}"[:28],
            }
        )
    return out
