"""Evaluate token pruning: dense, ours and matched-budget baselines on a LLaVA-JSON dataset.

    python evaluate.py --config configs/eval/tiny.yaml [--set key=value ...]
    python evaluate.py --random-init llava-1.5-7b --device cuda        # speed only, random weights

The same as ``tpkit evaluate``; all logic lives in :mod:`tpkit.evaluation`.
"""

import sys

from tpkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]], prog="evaluate.py"))
