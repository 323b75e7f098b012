"""Train CapsNet on MNIST: `accelerate launch -q launch/train.py [flags]` (see --help)."""

from _checkout import run

if __name__ == "__main__":
    run("train")
