"""Questions and records of the synthetic benchmark, in LLaVA's conversation-JSON format.

One question per record by default (``turns=2..3`` for multi-turn records), short one-word answers:

- ``color``    "What color is the star?" -> "red" (the named shape is unique in the image)
- ``count``    "How many crosses are there?" -> "two" (count words, ``COUNT_WORDS``; "zero" possible)
- ``exist``    "Is there a blue circle in the image?" -> "yes"/"no", balanced 50/50. POPE-style
  negatives (``neg_type``): ``random`` (shape absent, any colour), ``popular`` (shape absent, colour
  taken from an object in the image, so the colour alone does not answer), ``adversarial`` (a
  colour swap: the shape *and* the colour are both present, on different objects).
- ``position`` "Where is the circle relative to the square?" -> "left"/"right"/"above"/"below"
  (both shapes unique; unambiguous: the boxes are disjoint along one axis and overlap along the other).

Every record is generated from its own random stream ``(seed, split, index)``, so a record does not
depend on ``n`` and the splits never share a stream. The ``ood`` split has more objects and other
sizes. Each record carries ``objects`` (shape, colour, pixel box ``[x0, y0, x1, y1]`` with exclusive
ends), ``named_objects`` (those its first question is about, :func:`named_objects`: what the
retention numbers of :mod:`tpkit.evaluation.retention` read), ``qtype`` and ``neg_type``.
:func:`text_corpus` lists the text a tokenizer must know, :func:`synthetic_processor` builds the
offline processor on it.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from tpkit.data.processor import build_processor
from tpkit.synthetic.scenes import (
    ALT_QUESTION_TEMPLATES,
    ANSWER_SUFFIX,
    COLORS,
    COUNT_WORDS,
    NEG_TYPES,
    POSITIONS,
    QTYPES,
    QUESTION_TEMPLATES,
    SHAPE_PLURALS,
    SHAPES,
    SPLITS,
    SyntheticConfig,
    place_objects,
    public_objects,
    random_specs,
    render_objects,
)

__all__ = [
    "make_record",
    "reword",
    "named_objects",
    "position_question",
    "relation",
    "text_corpus",
    "synthetic_processor",
]

# each split draws from its own random stream: no two splits share a record, whatever the seed
_SPLIT_STREAM = {split: i for i, split in enumerate(SPLITS)}
_TEMPLATES = {"base": QUESTION_TEMPLATES, "alt": ALT_QUESTION_TEMPLATES}


def _question(qtype: str, **kw: str) -> str:
    return QUESTION_TEMPLATES[qtype].format(**kw) + "\n" + ANSWER_SUFFIX


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    body = "".join(re.escape(t) if i % 2 == 0 else f"(?P<{t}>\\w+)" for i, t in enumerate(parts))
    return re.compile(body)


# every wording's templates, (qtype, regex) pairs
_QUESTION_RES = [(q, _template_regex(t)) for ts in _TEMPLATES.values() for q, t in ts.items()]


def reword(question: str, wording: str) -> str:
    """``question`` (asked with :data:`QUESTION_TEMPLATES`) in the words of ``wording``'s templates."""
    if wording == "base":
        return question
    for qtype, template in QUESTION_TEMPLATES.items():
        m = _template_regex(template).search(question)
        if m is not None:
            return (
                question[: m.start()]
                + _TEMPLATES[wording][qtype].format(**m.groupdict())
                + question[m.end() :]
            )
    raise ValueError(f"{question!r} matches none of the question templates")


def named_objects(record: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The objects of ``record`` that its (first) question is about, or None if it cannot tell.

    colour: the one object of the named shape; count: every object of the shape (none for "zero");
    exist: the named colour-and-shape object (none when the answer is "no"); position: both named
    objects. None for records without ``objects`` or a question the benchmark's templates do not
    match (real LLaVA data), so callers can skip them.
    """
    objects, conv = record.get("objects"), record.get("conversations")
    if not objects or not conv:
        return None
    text = conv[0]["value"].replace("<image>", " ")
    for qtype, rx in _QUESTION_RES:
        m = rx.search(text)
        if m is None:
            continue
        g = m.groupdict()
        if qtype == "count":
            shape = next((sh for sh, pl in SHAPE_PLURALS.items() if pl == g["shapes"]), None)
            return [o for o in objects if o["shape"] == shape]
        if qtype == "exist":
            return [o for o in objects if (o["color"], o["shape"]) == (g["color"], g["shape"])]
        names = [g["shape"]] + ([g["other"]] if qtype == "position" else [])
        found = [[o for o in objects if o["shape"] == sh] for sh in names]
        return [o for group in found for o in group] if all(len(f) == 1 for f in found) else None
    return None


def _unique_shapes(objects: list[dict[str, Any]]) -> list[str]:
    counts: dict[str, int] = {}
    for o in objects:
        counts[o["shape"]] = counts.get(o["shape"], 0) + 1
    return [sh for sh in SHAPES if counts.get(sh) == 1]


def _q_color(rng: np.random.Generator, objects: list[dict[str, Any]]) -> tuple[str, str, None] | None:
    unique = _unique_shapes(objects)
    if not unique:
        return None
    shape = unique[int(rng.integers(len(unique)))]
    color = next(o["color"] for o in objects if o["shape"] == shape)
    return _question("color", shape=shape), color, None


def _q_count(
    rng: np.random.Generator, objects: list[dict[str, Any]], shape: str | None = None
) -> tuple[str, str, None]:
    if shape is None:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
    k = sum(o["shape"] == shape for o in objects)
    return _question("count", shapes=SHAPE_PLURALS[shape]), COUNT_WORDS[k], None


def _q_exist(
    rng: np.random.Generator, objects: list[dict[str, Any]], yes: bool, neg_type: str | None
) -> tuple[str, str, str | None] | None:
    present = {(o["color"], o["shape"]) for o in objects}
    if yes:
        o = objects[int(rng.integers(len(objects)))]
        return _question("exist", color=o["color"], shape=o["shape"]), "yes", None
    shapes_in = {o["shape"] for o in objects}
    colors_in = sorted({o["color"] for o in objects}, key=COLORS.index)
    absent = [sh for sh in SHAPES if sh not in shapes_in]
    if neg_type == "random":
        cands = [(c, sh) for sh in absent for c in COLORS]
    elif neg_type == "popular":
        cands = [(c, sh) for sh in absent for c in colors_in]
    elif neg_type == "adversarial":  # both attributes present, never on the same object
        cands = [(c, sh) for sh in SHAPES if sh in shapes_in for c in colors_in if (c, sh) not in present]
    else:
        raise ValueError(f"neg_type = {neg_type!r} is not one of {list(NEG_TYPES)}")
    if not cands:
        return None
    color, shape = cands[int(rng.integers(len(cands)))]
    return _question("exist", color=color, shape=shape), "no", neg_type


def relation(a: list[int], b: list[int]) -> str | None:
    """Where box ``a`` is relative to box ``b``; None unless exactly one relation holds.

    "left" means ``a`` ends before ``b`` starts horizontally *and* their vertical extents overlap,
    so a diagonal pair (both left and above) is never asked about.
    """
    rel = [a[2] <= b[0], b[2] <= a[0], a[3] <= b[1], b[3] <= a[1]]
    return POSITIONS[rel.index(True)] if sum(rel) == 1 else None


def position_question(
    rng: np.random.Generator, objects: list[dict[str, Any]]
) -> tuple[str, str, None] | None:
    unique = set(_unique_shapes(objects))
    objs = [o for o in objects if o["shape"] in unique]
    pairs = []
    for a in objs:
        for b in objs:
            if a is not b and (rel := relation(a["box"], b["box"])) is not None:
                pairs.append((a["shape"], b["shape"], rel))
    if not pairs:
        return None
    shape, other, rel = pairs[int(rng.integers(len(pairs)))]
    return _question("position", shape=shape, other=other), rel, None


def _ask(
    rng: np.random.Generator,
    qtype: str,
    objects: list[dict[str, Any]],
    yes: bool,
    neg_type: str | None,
    **kw: Any,
) -> tuple[str, str, str | None] | None:
    if qtype == "color":
        return _q_color(rng, objects)
    if qtype == "count":
        return _q_count(rng, objects, kw.get("shape"))
    if qtype == "exist":
        return _q_exist(rng, objects, yes, neg_type)
    if qtype == "position":
        return position_question(rng, objects)
    raise ValueError(f"qtype = {qtype!r} is not one of {list(QTYPES)}")


def _plan_first(
    rng: np.random.Generator, cfg: SyntheticConfig, qtype: str, yes: bool, neg_type: str | None
) -> tuple[list[dict[str, Any]], tuple[str, str, str | None]]:
    """Sample scenes until the first question of the record can be asked about them."""
    for _ in range(500):
        kw: dict[str, Any] = {}
        if qtype == "count":  # target count uniform over 0..max_count; other objects other shapes
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            k = int(rng.integers(0, cfg.max_count + 1))
            n = int(rng.integers(max(cfg.min_objects, k, 1), cfg.max_objects + 1))
            others = [sh for sh in SHAPES if sh != shape]
            specs = [(shape, COLORS[int(rng.integers(len(COLORS)))]) for _ in range(k)]
            specs += [
                (others[int(rng.integers(len(others)))], COLORS[int(rng.integers(len(COLORS)))])
                for _ in range(n - k)
            ]
            specs = [specs[j] for j in rng.permutation(len(specs))]
            kw["shape"] = shape
        else:
            lo = 2 if qtype == "position" or (qtype == "exist" and neg_type == "adversarial") else 1
            n = int(rng.integers(max(cfg.min_objects, lo), max(cfg.max_objects, lo) + 1))
            specs = random_specs(rng, cfg, n)
        objects = place_objects(rng, cfg, specs)
        if objects is None:
            continue
        qa = _ask(rng, qtype, objects, yes, neg_type, **kw)
        if qa is not None:
            return objects, qa
    raise RuntimeError(
        f"could not sample a scene for a {qtype!r} question (neg_type={neg_type}); check the config"
    )


def make_record(
    index: int, split: str, seed: int, cfg: SyntheticConfig | None = None, render: bool = True
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Record ``index`` of a split -> (LLaVA record, image uint8 (S, S, 3) or None if not ``render``).

    The first question's type cycles through ``QTYPES`` with the index; existence questions
    alternate yes/no and cycle the negative type, so a split is balanced exactly. Later turns of a
    multi-turn record ask other question types about the same image (random yes/no).
    """
    cfg = cfg or SyntheticConfig.for_split(split)
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split = {split!r} is not one of {list(SPLITS)}")
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
    qtype = QTYPES[index % len(QTYPES)]
    k = index // len(QTYPES)  # the k-th question of this type in the split
    yes = qtype == "exist" and k % 2 == 0
    neg_type = NEG_TYPES[(k // 2) % len(NEG_TYPES)] if qtype == "exist" and not yes else None
    objects, qa = _plan_first(rng, cfg, qtype, yes, neg_type)
    turns = [(qtype, *qa)]
    rest = [q for q in QTYPES if q != qtype]
    for j in rng.permutation(len(rest)):
        if len(turns) >= cfg.turns:
            break
        q = rest[j]
        y = bool(rng.random() < 0.5)
        nt = NEG_TYPES[int(rng.integers(len(NEG_TYPES)))]
        extra = _ask(rng, q, objects, y, None if y else nt)
        if extra is None and q == "exist":
            extra = _ask(rng, q, objects, False, "random") or _ask(rng, q, objects, True, None)
        if extra is not None:
            turns.append((q, *extra))

    image = render_objects(rng, cfg, objects) if render else None
    conversations = []
    for t, (_, question, answer, _) in enumerate(turns):
        question = reword(question, cfg.wording)
        conversations.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    record: dict[str, Any] = {
        "id": f"{split}-{index:06d}",
        "image": f"images/{split}/{index:06d}.png",
        "conversations": conversations,
        "qtype": qtype,
        "neg_type": neg_type,
        "objects": public_objects(objects),
    }
    record["named_objects"] = named_objects(record)
    if cfg.turns > 1:
        record["qtypes"] = [t[0] for t in turns]
        record["neg_types"] = [t[3] for t in turns]
    return record, image


# --------------------------------------------------------------------------------------------
# Text for tokenizer training


def text_corpus(n: int = 1000, seed: int = 0) -> list[str]:
    """Every question and answer string the benchmark can produce, then ``n`` sampled QA lines.

    The first part enumerates all filled templates (with the answer suffix), all answers and the
    vocabulary words; the second is ``n`` records' "question answer" text (no images rendered),
    drawn from train and ood streams, so token frequencies look like the data.
    """
    out: list[str] = []
    for sh in SHAPES:
        out.append(_question("color", shape=sh))
        out.append(_question("count", shapes=SHAPE_PLURALS[sh]))
        for c in COLORS:
            out.append(_question("exist", color=c, shape=sh))
        for other in SHAPES:
            if other != sh:
                out.append(_question("position", shape=sh, other=other))
    out += list(COLORS) + list(COUNT_WORDS) + list(POSITIONS) + ["yes", "no"]
    out += list(SHAPES) + list(SHAPE_PLURALS.values()) + [ANSWER_SUFFIX, "<image>"]
    cfg_ood = SyntheticConfig.for_split("ood")
    for i in range(n):
        split = "ood" if i % 5 == 4 else "train"
        rec, _ = make_record(i, split, seed + 7919, cfg_ood if split == "ood" else None, render=False)
        conv = rec["conversations"]
        for t in range(0, len(conv), 2):
            out.append(conv[t]["value"].replace("<image>\n", "") + " " + conv[t + 1]["value"])
    return out


def synthetic_processor(image_size: int = 96, patch_size: int = 8):
    """The offline ``LlavaProcessor`` whose tokenizer is trained on :func:`text_corpus` (what the
    embedded base model ``assets/tiny-llava`` was built with)."""
    return build_processor(image_size=image_size, patch_size=patch_size, corpus=text_corpus())
