"""What ``--resume``'s check of the training data costs: the fingerprint (size + SHA-256 of the bytes)
of a LLaVA-JSON file of N records, beside parsing the same file (which loading the data costs anyway).

    python benchmarks/resume_fingerprint.py                  # 100,000 records
    python benchmarks/resume_fingerprint.py --records 1000

The records are 64 of the synthetic benchmark's repeated (ids made unique), written with ``indent=1``
as ``tpkit data synthetic`` writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tpkit.synthetic.splits import generate_split  # noqa: E402
from tpkit.training.rundir import data_fingerprint  # noqa: E402


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.json"
        base = json.loads(generate_split(Path(tmp) / "base", "train", n=64, seed=0).read_text())
        records = [{**base[i % len(base)], "id": f"r{i:07d}"} for i in range(args.records)]
        path.write_text(json.dumps(records, indent=1) + "\n")
        size = path.stat().st_size
        data_fingerprint({"data.train_json": str(path)})  # the page cache warm, as after the run's own read
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            data_fingerprint({"data.train_json": str(path)})
            best = min(best, time.perf_counter() - t)
        t = time.perf_counter()
        json.loads(path.read_text())
        parse = time.perf_counter() - t
    print(f"{args.records} records, {size / 1e6:.1f} MB")
    print(f"json.loads: {parse * 1e3:.0f} ms")
    print(f"HEADLINE resume data fingerprint: {best * 1e3:.0f} ms (best of {args.repeats})")
    return best


if __name__ == "__main__":
    main()
