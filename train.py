"""Fine-tune a LLaVA-style model with LoRA, the token pruner in the forward path and distillation.

    python train.py --config configs/train_tiny.yaml [--set optim.lr=1e-4 ...] [--resume]

All logic lives in :mod:`tpkit.training.run`.
"""

import sys

from tpkit.training.run import main

if __name__ == "__main__":
    sys.exit(main())
