"""Train CapsNet on MNIST: `accelerate launch launch/train.py [flags]` (see --help)."""

import sys

from capsfast.train import main

if __name__ == "__main__":
    sys.exit(main())
