"""Predict digits in image files or folders with an exported model.

python launch/predict.py --model runs/NAME/model [--json] [--device cpu] PATH...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from capsfast.infer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
