"""Train CapsNet on MNIST: `accelerate launch launch/train.py [flags]` (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from capsfast.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
