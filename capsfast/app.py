"""Draw-a-digit browser app (Gradio, the optional `app` extra: pip install capsfast[app]).

Draw with the mouse (or upload a picture), see the prediction, the ten capsule lengths as bars,
the 28x28 input the model saw, the reconstruction from the predicted capsule, and sixteen sliders
that move that capsule's dimensions and redraw the reconstruction live.

An uploaded picture reaches the app as the uploaded file itself (gradio's filepath, no image mode:
nothing converted on the way) and is read by `capsfast.infer.read_digit`, as `predict` reads it:
the same file gives the same input and the same label in both (16-bit, palette, CMYK included).

gradio is imported inside `build_app` / `main` only; analytics are off and no share link is ever
made, so the app runs offline (e.g. on a GPU box reached through `ssh -L PORT:localhost:PORT`).
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import inspect
import os
import socket

import torch

from capsfast.errors import UserError
from capsfast.infer import ImageError, has_decoder, read_digit, to_uint8

DELTA_RANGE = 0.25  # slider range, as in the capsule-dimension figure
DEFAULT_MODEL = "mnist"  # the shipped model the app serves when given none
DISPLAY = 8  # 28x28 images are shown at 8x (224 px), nearest neighbour; others near 224 px
RECON_ID, PRED_ID = "reconstruction", "prediction"

__all__ = ["AppModel", "build_app", "main"]


def _upscale(image: torch.Tensor):
    """float [1, 28, 28] -> uint8 numpy [224, 224] for display; colour [3, S, S] -> [., ., 3]."""
    side = image.shape[-1]
    scale = DISPLAY if side == 28 else max(1, (DISPLAY * 28) // side)
    if image.dim() == 3 and image.shape[0] == 3:
        arr = to_uint8(image).permute(1, 2, 0)
    else:
        arr = to_uint8(image.reshape(image.shape[-2:]))
    return arr.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy()


class AppModel:
    """The app's logic without any gradio: predict a drawing, decode a moved capsule."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.config = model.config
        self.num_classes = model.config.num_classes
        # The paper's baseline CNN has no capsules and no decoder: probabilities, no sliders.
        self.capsules = has_decoder(model)
        self.dim = model.config.digit_dim if self.capsules else 0
        self.class_names = model.config.labels  # the bars' labels

    @torch.no_grad()
    def analyse(self, picture) -> dict:
        """picture: an uploaded file's path, a sketchpad value, an array or PIL image ->
        prediction dict (raises ImageError)."""
        x = read_digit(_picture(picture), self.config)
        out = self.model(x.unsqueeze(0).to(self.device))
        if not self.capsules:  # the baseline: softmax probabilities, nothing to reconstruct
            lengths = out.scores[0].float().softmax(0).cpu()
        else:
            lengths = out.lengths[0].float().cpu()
        label = int(lengths.argmax())
        return {
            "label": label,
            "class_name": self.class_names[label],
            "lengths": [float(v) for v in lengths],
            "pose": [float(v) for v in out.poses[0, label].float().cpu()] if self.capsules else [],
            "input": x,
            "reconstruction": out.reconstructions[0].float().cpu() if self.capsules else None,
        }

    @torch.no_grad()
    def decode(self, label: int, pose: list[float], deltas: list[float]) -> torch.Tensor:
        """Reconstruct [C, S, S] from capsule `label` with `pose` + `deltas`, others zero."""
        poses = torch.zeros(1, self.num_classes, self.dim, device=self.device)
        poses[0, label] = torch.tensor(pose, device=self.device) + torch.tensor(
            [float(d) for d in deltas], device=self.device
        )
        labels = torch.tensor([label], device=self.device)
        return self.model.decode(poses, labels)[0].float().cpu()


def _picture(value):
    """A gradio Sketchpad/ImageEditor value is a dict; its `composite` is the drawing."""
    if isinstance(value, dict):
        value = value.get("composite", value.get("image"))
    if value is None:
        raise ImageError("nothing drawn yet")
    return value


def _kwargs(fn, **kwargs) -> dict:
    """The keyword arguments `fn` accepts (gradio's signatures differ between 4, 5 and 6)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def build_app(model: torch.nn.Module):
    """The gradio Blocks of the app around a loaded model (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    logic = AppModel(model)
    size = logic.config.image_size
    blank = _upscale(torch.zeros(logic.config.in_channels, size, size))
    with gr.Blocks(**_kwargs(gr.Blocks.__init__, title="capsfast: draw a digit")) as demo:
        gr.Markdown(
            "## capsfast: draw a digit\nPick the brush, draw one digit with the mouse (or upload a "
            "picture). "
            "The sliders move the predicted capsule's 16 dimensions and redraw the reconstruction."
        )
        state = gr.State(None)  # {"label": int, "pose": [16 floats]}
        with gr.Row():
            sketch, upload = _input_column(gr)
            prediction, bars, seen, recon = _output_column(gr, logic, size, blank)
            sliders = _slider_column(gr, logic.dim)
        outputs = [prediction, bars, seen, recon, state, *sliders]
        for component in (sketch, upload):
            component.change(functools.partial(_on_picture, logic, blank), inputs=component,
                             outputs=outputs, trigger_mode="always_last")  # fmt: skip
        for s in sliders:
            s.input(functools.partial(_on_slider, logic, blank), inputs=[state, *sliders],
                    outputs=recon, trigger_mode="always_last")  # fmt: skip
    return demo


def _input_column(gr):
    """(sketchpad, upload): a digit drawn with the mouse, or a picture file."""
    with gr.Column():
        with gr.Tab("Draw"):
            brush = gr.Brush(default_size=24, colors=["#000000"], color_mode="fixed")
            sketch = gr.Sketchpad(
                label="draw here", type="numpy", image_mode="RGBA", elem_id="sketchpad",
                **_kwargs(gr.Sketchpad.__init__, brush=brush, canvas_size=(400, 400),
                          layers=False),
            )  # fmt: skip
        with gr.Tab("Upload"):
            # The file as uploaded: an image mode would convert it (16-bit clipped).
            upload = gr.Image(label="picture of a digit", type="filepath", image_mode=None,
                              sources=["upload"], elem_id="upload", height=320)  # fmt: skip
    return sketch, upload


def _output_column(gr, logic, size, blank):
    """(prediction text, capsule-length bars, what the model sees, its reconstruction)."""
    with gr.Column():
        prediction = gr.Markdown("**Prediction:** draw a digit", elem_id=PRED_ID)
        bars = gr.Label(
            label="capsule lengths |v_j|" if logic.capsules else "softmax probabilities",
            num_top_classes=logic.num_classes, elem_id="bars",
        )  # fmt: skip
        with gr.Row():
            png = _kwargs(gr.Image.__init__, format="png")
            seen = gr.Image(value=blank, label=f"what the model sees ({size}x{size})",
                            interactive=False, **png)  # fmt: skip
            recon = gr.Image(value=blank, label="reconstruction", interactive=False,
                             elem_id=RECON_ID, **png)  # fmt: skip
    return prediction, bars, seen, recon


def _slider_column(gr, dim: int) -> list:
    with gr.Column():
        gr.Markdown("**Capsule dimensions** (added to the predicted capsule)")
        return [gr.Slider(-DELTA_RANGE, DELTA_RANGE, value=0.0, step=0.01, label=f"dim {d}",
                          elem_id=f"dim{d}") for d in range(dim)]  # fmt: skip


def _on_picture(logic, blank, picture):
    """A new drawing or upload: prediction, bars, input, reconstruction, state, sliders reset."""
    zeros = [0.0] * logic.dim
    try:
        r = logic.analyse(picture)
    except ImageError as e:
        return ["**Prediction:** none (" + str(e) + ")", None, blank, blank, None, *zeros]
    label, lengths = r["label"], r["lengths"]
    text = f"**Prediction: {r['class_name']}** (capsule length {lengths[label]:.3f})"
    if r["reconstruction"] is None:
        text = (f"**Prediction: {r['class_name']}** (probability {lengths[label]:.3f}; "
                "the baseline CNN has no decoder: no reconstruction)")  # fmt: skip
    bars_value = dict(zip(logic.class_names, lengths, strict=True))
    reconstruction = blank if r["reconstruction"] is None else _upscale(r["reconstruction"])
    new_state = {"label": label, "pose": r["pose"]}
    return [text, bars_value, _upscale(r["input"]), reconstruction, new_state, *zeros]


def _on_slider(logic, blank, current, *deltas):
    if current is None:
        return blank
    return _upscale(logic.decode(current["label"], current["pose"], list(deltas)))


def check_port(host: str, port: int) -> None:
    """Refuse, in one line, a port that is taken (or a host this machine cannot listen on)
    before gradio starts, whose own message names neither --port nor --host."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(
                    f"port {port} on {host} is already in use (another app or server): "
                    "choose another with --port"
                ) from None
            raise UserError(
                f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --host "
                "(127.0.0.1: this machine only, 0.0.0.0: all interfaces) or --port"
            ) from None


def main(argv: list[str] | None = None) -> int:
    """`python launch/app.py [MODEL] [--port P] [--host H] [--device D]`: serve the app locally
    (no MODEL: the shipped mnist model)."""
    import argparse

    from capsfast.export import SHIPPED_DIR, shipped_name
    from capsfast.infer import ROUTINGS, load_for_inference

    parser = argparse.ArgumentParser(prog="app", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="exported model directory (model.safetensors + config.json), or the name of a "
        "shipped model; an existing directory of that name wins (default: the shipped mnist)",
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all; default local)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    parser.add_argument("--routing", default="auto", choices=ROUTINGS)
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port {args.port}: choose a port from 1 to 65535")

    if args.model is None:  # the shipped one, even where ./mnist exists
        args.model = str(SHIPPED_DIR / DEFAULT_MODEL)
        print(f"app: no model given: using the shipped model {DEFAULT_MODEL!r}", flush=True)
    elif shipped_name(args.model):
        print(f"app: using the shipped model {args.model!r}", flush=True)
    # Everything a user can get wrong is checked before gradio (seconds to import) loads.
    model = load_for_inference(args.model, args.device, args.routing)
    check_port(args.host, args.port)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    if importlib.util.find_spec("gradio") is None:
        raise UserError(
            "gradio is not installed; install the app extra: pip install 'capsfast[app]' "
            "(or pip install 'gradio>=4')"
        )
    demo = build_app(model)
    launch = _kwargs(
        demo.launch,
        server_name=args.host,
        server_port=args.port,
        share=False,
        prevent_thread_lock=True,
        quiet=True,
        inbrowser=False,
        ssr_mode=False,
        show_api=False,
        mcp_server=False,
        pwa=False,
    )
    try:
        _, local_url, _ = demo.launch(**launch)
    except OSError as e:  # taken between the check and the launch
        raise UserError(
            f"cannot serve on {args.host}:{args.port} ({e}): choose another --port"
        ) from None
    print(f"capsfast app running at: {local_url}", flush=True)
    print(
        f"  on a remote machine: ssh -L {args.port}:localhost:{args.port} HOST, then open "
        f"http://localhost:{args.port}/ here; Ctrl-C stops it",
        flush=True,
    )
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0
