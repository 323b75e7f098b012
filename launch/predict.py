"""Predict digits in image files or folders with an exported model.

python launch/predict.py --model runs/NAME/model [--json] [--device cpu] PATH...
"""

from _checkout import run

if __name__ == "__main__":
    run("predict")
