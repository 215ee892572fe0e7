"""``tpkit lmms-task``: a local lmms-eval task over a LLaVA-JSON file, for ``--model tpkit`` with no hub.

    tpkit lmms-task --data runs/data/synthetic/test.json --out runs/lmms_task
    lmms-eval --model tpkit --model_args pretrained=assets/tiny-llava --tasks tpkit_synthetic_test \\
        --include_path runs/lmms_task --batch_size 8

Writes into ``out``: ``data/`` (the records' first question and answer with their images, a
``datasets`` directory lmms-eval loads with ``load_from_disk``), ``<name>.yaml`` (``generate_until``,
exact match after ``tpkit evaluate``'s normalisation: case, punctuation and articles ignored, number
words as digits, so that both report the same accuracy), ``<name>_yesno_ll.yaml``
when some answers are yes or no (``multiple_choice``: "yes" and "no" as two continuations, scored
by loglikelihood) and ``utils.py`` (the tasks' functions). The records are checked as ``tpkit
evaluate`` checks them. Needs ``datasets`` only, not lmms-eval.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tpkit.data.records import IMAGE_PLACEHOLDER, check_records, role_of

__all__ = ["LmmsTask", "default_task_name", "write_lmms_task"]

YES_NO = ("yes", "no")

_UTILS = '''"""Functions of the lmms-eval tasks beside this file (written by `tpkit lmms-task`)."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    # the record's first question without its "<image>" placeholder: the model puts the image first
    return doc["question"]


def yes_no_docs(dataset):
    return dataset.filter(lambda doc: doc["answer"].strip().lower() in ("yes", "no"))


def yes_no_target(doc):
    return doc["answer"].strip().lower()


def exact_match(doc, results):
    # tpkit evaluate's rule (tpkit.evaluation.metrics.normalize_answer), so that the two agree
    from tpkit.evaluation.metrics import normalize_answer

    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
'''

_GENERATE = """# {name}: the first question of every record of {source}, answered by generation and scored by
# exact match after tpkit evaluate's normalisation (case, punctuation and articles ignored, number words
# as digits), so that both report the same accuracy (written by `tpkit lmms-task`)
task: {name}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.exact_match
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

_YES_NO = """# {name}: the questions of {source} whose answer is yes or no, with "yes" and "no" as two
# continuations; the lower mean negative log-likelihood is the choice (written by `tpkit lmms-task`)
task: {name}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
process_docs: !function utils.yes_no_docs
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: ["yes", "no"]
doc_to_target: !function utils.yes_no_target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


@dataclass
class LmmsTask:
    """What :func:`write_lmms_task` wrote."""

    out_dir: Path
    name: str  # the generation task
    n: int  # its questions
    yes_no_name: str | None  # the loglikelihood task (None: no yes/no answers)
    n_yes_no: int

    def command(self, model_args: str = "pretrained=MODEL") -> str:
        """The lmms-eval line that runs the tasks with ``--model tpkit``."""
        tasks = ",".join(t for t in (self.name, self.yes_no_name) if t)
        return (
            f"lmms-eval --model tpkit --model_args {model_args} --tasks {tasks} "
            f"--include_path {self.out_dir} --batch_size 8"
        )


def default_task_name(json_path: str | Path) -> str:
    """``tpkit_<folder>_<file>`` of a data file: runs/data/synthetic/test.json -> tpkit_synthetic_test."""
    p = Path(json_path).absolute()
    return "tpkit_" + re.sub(r"[^0-9a-zA-Z]+", "_", f"{p.parent.name}_{p.stem}").strip("_").lower()


def _first_turns(record: dict) -> tuple[str, str]:
    """(first question without its image placeholder, first answer) of a checked record."""
    question = next(t["value"] for t in record["conversations"] if role_of(t["from"]) == "user")
    answer = next(t["value"] for t in record["conversations"] if role_of(t["from"]) == "assistant")
    question = question.replace(f"{IMAGE_PLACEHOLDER}\n", "", 1).replace(IMAGE_PLACEHOLDER, "", 1).strip()
    return question, answer


def write_lmms_task(
    json_path: str | Path,
    out_dir: str | Path,
    name: str | None = None,
    *,
    image_folder: str | Path | None = None,
    max_new_tokens: int = 16,
) -> LmmsTask:
    """Write the tasks over ``json_path`` into ``out_dir`` (see the module doc); ``name`` defaults to
    :func:`default_task_name`. Every record is checked first (``LlavaDataError`` names a bad one)."""
    import datasets  # lazy: seconds to import, and only this command needs it

    name = name or default_task_name(json_path)
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"task name {name!r}: letters, digits and _ only (lmms-eval's --tasks splits on ,)")
    records, _ = check_records(json_path, image_folder, check_images="open")
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"id": [], "image": [], "question": [], "answer": [], "qtype": []}
    for r in records:
        question, answer = _first_turns(r)
        rows["id"].append(r["id"])
        rows["image"].append({"bytes": Path(r["image_path"]).read_bytes(), "path": None})  # self-contained
        rows["question"].append(question)
        rows["answer"].append(answer)
        rows["qtype"].append(str(r.get("qtype") or ""))
    ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(out / "data"))
    n_yes_no = sum(a.strip().lower() in YES_NO for a in rows["answer"])
    source = Path(json_path).name
    fields = {"source": source, "data": json.dumps(str(out / "data")), "max_new_tokens": max_new_tokens}
    (out / "utils.py").write_text(_UTILS)
    (out / f"{name}.yaml").write_text(_GENERATE.format(name=name, **fields))
    yes_no = f"{name}_yesno_ll" if n_yes_no else None
    if yes_no:
        (out / f"{yes_no}.yaml").write_text(_YES_NO.format(name=yes_no, **fields))
    else:
        (out / f"{name}_yesno_ll.yaml").unlink(missing_ok=True)  # a task left by an earlier file
    return LmmsTask(out, name, len(records), yes_no, n_yes_no)
