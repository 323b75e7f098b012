"""Draw-a-digit browser app for an exported model (needs the `app` extra: gradio).

    python launch/app.py runs/NAME/model [--port 7860] [--host 127.0.0.1] [--device cpu]

Prints a local URL; on a remote GPU box forward the port: ssh -L 7860:localhost:7860 HOST.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from capsfast.app import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
