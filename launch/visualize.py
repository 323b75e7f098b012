"""Figures of an exported model on the shipped MNIST test set, as PNG.

python launch/visualize.py runs/NAME/model [--out DIR] [--test-size N]
"""

from _checkout import run

if __name__ == "__main__":
    run("visualize")
