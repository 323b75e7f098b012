"""Figures of an exported model on the shipped MNIST test set, as PNG.

python launch/visualize.py runs/NAME/model [--out DIR] [--test-size N]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from capsfast.figures import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
