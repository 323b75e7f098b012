"""Write a trained model's inference graph as ONNX or torch.export .pt2, checked against PyTorch.

python launch/export.py runs/NAME/model --format onnx|pt2 --output FILE
"""

from _checkout import run

if __name__ == "__main__":
    run("export")
