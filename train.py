"""Fine-tune a LLaVA-style model with LoRA, the token pruner in the forward path and distillation.

    python train.py --config configs/train/tiny.yaml [--set optim.lr=1e-4 ...] [--resume]

The same as ``tpkit train``; all logic lives in :mod:`tpkit.training`.
"""

import sys

from tpkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], prog="train.py"))
