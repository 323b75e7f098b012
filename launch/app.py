"""Draw-a-digit browser app for an exported model (needs the `app` extra: gradio).

    python launch/app.py runs/NAME/model [--port 7860] [--host 127.0.0.1] [--device cpu]

Prints a local URL; on a remote GPU box forward the port: ssh -L 7860:localhost:7860 HOST.
"""

from _checkout import run

if __name__ == "__main__":
    run("app")
