"""Use a trained model: turn a person's image into the input the model expects, and predict.

MNIST digits are light-on-dark, size-normalised to fit a 20x20 box (aspect ratio kept) and placed
in a 28x28 field with their centre of mass at the centre. `preprocess` does the same to any
picture of one digit: any size, RGB or grey, with or without alpha, dark-on-light or light-on-dark
(detected from the border), digit anywhere in the frame. `read_digit` is the one way a file
becomes model input, for `predict` and the app alike.

Models of other data sets say in their config how a picture becomes their input
(`prepare_input`, by ModelConfig.input_style): "mnist" as above (MNIST, KMNIST, EMNIST), "fit"
(Fashion-MNIST: the object's box scaled to fill the frame, centred), "photo" (CIFAR-10, SVHN,
image folders: RGB or grey, the shorter side resized and the centre cropped, by the same function
that prepared the training images).

Nothing here needs training code: an exported model (model.safetensors + config.json) is enough.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from capsfast.errors import UserError, describe_os_error
from capsfast.export import load_model, output_dir, shipped_models
from capsfast.routing_choice import CHOICES as ROUTINGS  # the --routing choices
from capsfast.routing_choice import choose_routing

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
BOX = 20  # MNIST: the digit's bounding box is scaled to fit 20x20
FIELD = 28
INK_THRESHOLD = 0.05  # fraction of the ink range that counts as ink for the bounding box
MIN_CONTRAST = 0.08  # below this (max ink - background) there is no digit to read


class ImageError(UserError, ValueError):
    """An image that cannot be read or holds no digit; the message says which and why."""


__all__ = [
    "IMAGE_SUFFIXES",
    "ROUTINGS",
    "ImageError",
    "Prediction",
    "FileResult",
    "choose_device",
    "choose_routing",
    "expand_paths",
    "load_for_inference",
    "load_model",
    "load_image",
    "prepare_input",
    "preprocess",
    "preprocess_array",
    "preprocess_fit",
    "predict",
    "predict_files",
    "read_digit",
    "to_uint8",
]


def choose_device(device: str | None = None) -> torch.device:
    """`None`/"auto": the GPU where there is one, else the CPU. Raises UserError for a device
    that does not exist here (a typo, cuda without a GPU, cuda:3 on a one-GPU machine)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
        torch.empty(0, device=chosen)  # the one check that covers every device type
    except (RuntimeError, AssertionError, ValueError) as e:
        reason = " ".join(str(e).split())[:200]
        raise UserError(
            f"--device {device} cannot be used here ({reason}): use --device cpu, or auto"
        ) from None
    return chosen


def load_for_inference(model_dir: str | Path, device: str = "auto", routing: str = "auto"):
    """The exported model in `model_dir` on `device` (eval mode), checked before any image is
    read: the device exists, the routing runs there. Any data set's model: its config says how
    a picture becomes its input (prepare_input)."""
    from capsfast.model import CapsNet

    chosen = choose_device(device)
    if routing not in ROUTINGS:  # before reading the model: a typo costs nothing
        raise UserError(f"--routing {routing!r}: choose one of {', '.join(ROUTINGS)}")
    model = load_model(model_dir, device=chosen, routing="torch")
    config = model.config if isinstance(model, CapsNet) else None
    impl, _, note = choose_routing(routing, config, chosen)
    if note:
        print(f"capsfast: {note}", file=sys.stderr)
    model.set_routing(impl)
    return model


# --- reading images --------------------------------------------------------------------------


def load_image(source) -> torch.Tensor:
    """Read a path, PIL image or array into grey float [H, W] in [0, 1] (not yet MNIST-like).

    EXIF orientation is applied. A transparent background is flattened onto the colour that
    contrasts with the strokes (white under dark strokes, black under light ones), so a drawing
    on a transparent canvas reads the same whatever its ink colour.
    """
    return _to_grey(open_image(source))


def open_image(source):
    """A path, PIL image or array [H, W] / [H, W, C] (uint8, or float in [0, 1]) -> PIL image,
    EXIF orientation applied; an unreadable file is an ImageError that says why."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, (str, Path)):
        path = Path(source)
        _check_image_path(path)
        from capsfast.datasets import ImageTooLarge, open_limited

        try:
            with open_limited(path) as img:  # at most datasets.MAX_PIXELS pixels
                img.load()
                img = ImageOps.exif_transpose(img)
        except UnidentifiedImageError:
            raise ImageError("not an image file (PIL cannot identify it)") from None
        except ImageTooLarge as e:
            raise ImageError(str(e)) from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"unreadable or corrupt image ({e})") from None
    elif isinstance(source, Image.Image):
        img = source
    else:  # numpy array or tensor [H, W] / [H, W, C], uint8 or float in [0, 1]
        t = torch.as_tensor(source)
        if t.dtype.is_floating_point:
            _check_finite(t)
            t = (t.clamp(0, 1) * 255).round()
        arr = t.to(torch.uint8).cpu().numpy()
        img = Image.fromarray(arr)
    return img


def _check_image_path(path: Path) -> None:
    """Say what a path is when it is no image file: missing, a broken or looping link, a folder,
    a pipe or device (which would block a reader forever)."""
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ImageError("symbolic link loop (the link leads back to itself)") from None
        raise ImageError(f"dangling symbolic link: its target {os.readlink(path)} does not exist")
    if not path.exists():
        raise ImageError("no such file")
    if path.is_dir():
        raise ImageError("is a directory")
    if not path.is_file():
        raise ImageError("not a regular file (a pipe, socket or device): give an image file")


def _check_finite(t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ImageError("the image has NaN or infinite pixels: save it without them")


def _to_grey(img) -> torch.Tensor:
    import numpy as np

    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode.startswith("I") or img.mode == "F":  # 16- and 32-bit integer, 32-bit float
        a = torch.from_numpy(np.asarray(img, dtype=np.float64).copy())
        _check_finite(a)
        lo, hi = a.min(), a.max()
        return ((a - lo) / (hi - lo).clamp_min(1e-12)).float()
    alpha = None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = _tensor(rgba.getchannel("A"))
        grey = _tensor(rgba.convert("L"))
    else:
        grey = _tensor(img.convert("L"))
    if alpha is not None and float(alpha.min()) < 1.0:
        weight = alpha.sum()
        if float(weight) == 0:
            return torch.zeros_like(grey)  # fully transparent: blank, rejected in preprocess
        ink_level = float((grey * alpha).sum() / weight)
        background = 1.0 if ink_level < 0.5 else 0.0
        grey = grey * alpha + background * (1 - alpha)
    return grey


def _tensor(img) -> torch.Tensor:
    """8-bit PIL image (one band) -> float [H, W] in [0, 1]."""
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(img.height, img.width).float() / 255.0


# --- MNIST-like normalisation ------------------------------------------------------------------


def preprocess_array(grey: torch.Tensor) -> torch.Tensor:
    """Grey float [H, W] in [0, 1] -> MNIST-like [1, 28, 28] float in [0, 1].

    1. polarity: the border's median is the background; a light background is inverted so the
       digit is light on dark, as in MNIST;
    2. contrast: background -> 0, the brightest ink -> 1;
    3. crop to the ink's bounding box, scale (antialiased, aspect kept) to fit 20x20;
    4. paste into 28x28 with the centre of mass at the centre.
    Raises ImageError for a blank image.
    """
    g = grey.float()
    if g.dim() != 2 or min(g.shape) < 1:
        raise ImageError(f"expected a 2-D grey image, got shape {tuple(g.shape)}")
    h, w = g.shape
    b = max(1, min(h, w) // 20)  # border strip: 5% of the shorter side, at least a pixel
    border = torch.cat([g[:b].flatten(), g[-b:].flatten(), g[:, :b].flatten(), g[:, -b:].flatten()])
    background = float(border.median())
    if background > 0.5:
        g, background = 1.0 - g, 1.0 - background
    ink = (g - background).clamp_min(0)
    peak = float(ink.max())
    if peak < MIN_CONTRAST:
        raise ImageError("blank image: no digit found (no pixel stands out from the background)")
    ink = ink / peak

    rows = torch.nonzero((ink > INK_THRESHOLD).any(1)).flatten()
    cols = torch.nonzero((ink > INK_THRESHOLD).any(0)).flatten()
    crop = ink[int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1]
    ch, cw = crop.shape
    scale = BOX / max(ch, cw)
    nh, nw = max(1, round(ch * scale)), max(1, round(cw * scale))
    small = F.interpolate(
        crop[None, None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False
    )[0, 0].clamp(0, 1)
    if float(small.max()) > 0:
        small = small / small.max()  # thin strokes on a big canvas fade when shrunk: restore

    mass = small.sum()
    ys = torch.arange(nh, dtype=small.dtype)
    xs = torch.arange(nw, dtype=small.dtype)
    cy = float((small.sum(1) * ys).sum() / mass)
    cx = float((small.sum(0) * xs).sum() / mass)
    centre = FIELD / 2  # MNIST puts the centre of mass at pixel (14, 14) (measured: 14.0)
    top, left = round(centre - cy), round(centre - cx)
    # Paste on a canvas with room for any offset, then cut the 28x28 field out of it.
    pad = FIELD
    canvas = torch.zeros(FIELD + 2 * pad, FIELD + 2 * pad)
    canvas[pad + top : pad + top + nh, pad + left : pad + left + nw] = small
    return canvas[pad : pad + FIELD, pad : pad + FIELD].unsqueeze(0).contiguous()


def preprocess(source) -> torch.Tensor:
    """A path, PIL image or array of one digit -> MNIST-like [1, 28, 28] float in [0, 1]."""
    return preprocess_array(load_image(source))


# --- other data sets' inputs ---------------------------------------------------------------------


def preprocess_fit(grey: torch.Tensor, size: int = FIELD) -> torch.Tensor:
    """Grey float [H, W] in [0, 1] -> [1, size, size]: light on dark (polarity from the border,
    as preprocess_array), the object's bounding box scaled (aspect kept) to fill the frame and
    centred, as Fashion-MNIST's pictures were made. Raises ImageError for a blank image."""
    g = grey.float()
    h, w = g.shape
    b = max(1, min(h, w) // 20)
    border = torch.cat([g[:b].flatten(), g[-b:].flatten(), g[:, :b].flatten(), g[:, -b:].flatten()])
    background = float(border.median())
    if background > 0.5:
        g, background = 1.0 - g, 1.0 - background
    ink = (g - background).clamp_min(0)
    if float(ink.max()) < MIN_CONTRAST:
        raise ImageError("blank image: nothing stands out from the background")
    mask = ink > INK_THRESHOLD * float(ink.max())
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    crop = g[int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1] - background
    ch, cw = crop.shape
    scale = size / max(ch, cw)
    nh, nw = max(1, round(ch * scale)), max(1, round(cw * scale))
    small = F.interpolate(
        crop.clamp_min(0)[None, None], size=(nh, nw), mode="bilinear", antialias=True
    )[0, 0].clamp(0, 1)
    out = torch.zeros(size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = small
    return out.unsqueeze(0)


def prepare_input(config, source) -> torch.Tensor:
    """A path, PIL image or array -> the float [C, S, S] input in [0, 1] that a model with
    ModelConfig `config` expects, by its input_style (see the module docstring). `config` may
    also be the model's export directory or shipped name (read without its weights), so that
    an ONNX or pt2 graph of the model gets exactly what `predict` gives the model."""
    from capsfast.data import centre_crop
    from capsfast.datasets import image_to_tensor

    if isinstance(config, (str, Path)):
        from capsfast.export import model_config

        config = model_config(config)
    C, S = config.in_channels, config.image_size
    if config.input_style == "photo":
        img = open_image(source)
        try:
            x = image_to_tensor(img, C, config.input_resize or S)
        except Exception as e:  # a mode Pillow cannot convert to RGB or grey
            raise ImageError(f"cannot convert the {img.mode} image ({e})") from None
        return centre_crop(x, S).float() / 255.0
    grey = load_image(source)
    x = preprocess_fit(grey) if config.input_style == "fit" else preprocess_array(grey)
    if x.shape[-1] != S:  # a digit-style model at another size
        x = F.interpolate(x[None], size=(S, S), mode="bilinear", antialias=True)[0].clamp(0, 1)
    return x.expand(C, S, S).contiguous()


def read_digit(source, config=None) -> torch.Tensor:
    """`preprocess` (or, given the model's ModelConfig, `prepare_input`) inside one file's error
    boundary: whatever reading, converting or checking this one image raises becomes an
    ImageError that says why, so a file that fails costs that file only. `predict` and the app
    both read every picture through here."""
    try:
        return preprocess(source) if config is None else prepare_input(config, source)
    except ImageError:
        raise
    except OSError as e:  # permission denied, I/O error: the file system's words, not PIL's
        if e.errno is not None:
            raise ImageError(describe_os_error(OSError(e.errno, e.strerror))) from e
        raise ImageError(f"cannot read this image ({_one_line(e)})") from e
    except Exception as e:  # PIL, numpy, torch on a file they cannot handle (e.g. LAB colour)
        raise ImageError(f"cannot read this image ({type(e).__name__}: {_one_line(e)})") from e


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [..., H, W] in [0, 1] -> uint8, for saving or display."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


# --- prediction --------------------------------------------------------------------------------


@dataclass
class Prediction:
    labels: torch.Tensor  # [B] int64: the longest capsule
    # [B, K]: capsule lengths (K classes; MNIST 10); the baseline CNN: its softmax probabilities
    lengths: torch.Tensor
    poses: torch.Tensor | None  # [B, K, 16]; None for the baseline CNN (no capsules)
    # [B, C, S, S] (MNIST [B, 1, 28, 28]), from the predicted capsule; None for the baseline
    reconstructions: torch.Tensor | None


@torch.no_grad()
def predict(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256, progress: bool = False
) -> Prediction:
    """Run `model` (eval mode, no grad) over float images [B, C, S, S]; results on the CPU.

    progress: show a tqdm bar on stderr (for long evaluations)."""
    from tqdm.auto import tqdm

    net = model
    was_training = net.training
    net.eval()
    param = next(net.parameters())
    device, dtype = param.device, param.dtype  # fp32 normally; bf16/fp16 weights work too
    parts = []
    bar = tqdm(
        total=images.shape[0],
        unit="img",
        desc="evaluating",
        disable=not progress,
        file=sys.stderr,
        leave=False,  # gone when done: what follows is the line that matters
    )
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(device, dtype)
            out = net(x)
            if out.reconstructions is None:  # the baseline CNN: probabilities, nothing else
                parts.append((out.scores.float().softmax(1).cpu(), None, None))
            else:
                parts.append(
                    (
                        out.lengths.float().cpu(),
                        out.poses.float().cpu(),
                        out.reconstructions.float().cpu(),
                    )
                )
            bar.update(x.shape[0])
    finally:
        bar.close()
        net.train(was_training)
    cfg = net.config
    if not parts:
        capsules = has_decoder(net)
        return Prediction(
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, cfg.num_classes),
            torch.zeros(0, cfg.num_classes, cfg.digit_dim) if capsules else None,
            torch.zeros(0, cfg.in_channels, cfg.image_size, cfg.image_size) if capsules else None,
        )
    lengths, poses, recon = (
        None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True)
    )
    return Prediction(lengths.argmax(1), lengths, poses, recon)


def has_decoder(model: torch.nn.Module) -> bool:
    """CapsNet reconstructs its input; the paper's baseline CNN (capsfast.baseline) cannot."""
    return hasattr(model, "decode")


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given (whatever their suffix); folders -> their image files, recursively, sorted.

    Every entry with an image suffix that is not a folder is kept, broken and looping symbolic
    links included, so that reading it reports it instead of it vanishing without a word."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = (f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            out.extend(sorted(f for f in found if not f.is_dir()))
        else:
            out.append(p)
    return out


@dataclass
class FileResult:
    path: Path
    label: int | None = None
    lengths: list[float] | None = None
    error: str | None = None
    input: torch.Tensor | None = None  # [C, S, S] the image the model saw (MNIST: [1, 28, 28])
    reconstruction: torch.Tensor | None = None  # [C, S, S]
    class_name: str | None = None  # the model's name for `label` (MNIST: "7 - seven")

    @property
    def ok(self) -> bool:
        return self.error is None


def predict_files(
    model: torch.nn.Module, paths: Iterable[str | Path], batch_size: int = 256
) -> Iterator[FileResult]:
    """Predict every image in `paths` (folders expanded), in order, `batch_size` at a time.

    A file that cannot be read, whatever the reason, gives a FileResult with `error` set; the
    others are unaffected.
    """
    files = expand_paths(paths)
    config = model.config
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        results = [FileResult(path) for path in chunk]
        good, tensors = [], []
        for r in results:
            try:
                tensors.append(read_digit(r.path, config))
                good.append(r)
            except ImageError as e:  # read_digit turns every failure of this file into one
                r.error = str(e)
        if tensors:
            batch = torch.stack(tensors)
            pred = predict(model, batch, batch_size)
            for i, r in enumerate(good):
                r.label = int(pred.labels[i])
                r.class_name = config.labels[r.label]
                r.lengths = [float(v) for v in pred.lengths[i]]
                r.input = batch[i]
                if pred.reconstructions is not None:
                    r.reconstruction = pred.reconstructions[i]
        yield from results


# --- command line: launch/predict.py, console script capsfast-predict ------------------------


def _save_png(image: torch.Tensor, path: Path, scale: int = 1) -> None:
    from PIL import Image

    arr = to_uint8(image.squeeze(0)).numpy()
    if arr.ndim == 3:  # colour [3, H, W] -> [H, W, 3]
        arr = arr.transpose(1, 2, 0)
    img = Image.fromarray(arr, mode="L") if arr.ndim == 2 else Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def prediction_line(r: FileResult) -> str:
    """`path: 3 (cat)  (lengths 0-9: ...)`: the class index, its name when that says more."""
    lengths = " ".join(f"{v:.3f}" for v in r.lengths)
    name = "" if r.class_name in (None, str(r.label)) else f" ({r.class_name})"
    return f"{r.path}: {r.label}{name}  (lengths 0-{len(r.lengths) - 1}: {lengths})"


RECONSTRUCTIONS = "reconstructions"  # default --save-reconstructions folder, inside the model's
OUTPUT_SUFFIXES = (".recon.png", ".input.png")  # what --save-reconstructions writes


def reconstruction_dir(value: str, model_dir: str | Path) -> Path:
    """Where --save-reconstructions writes: DIR as given, else MODEL/reconstructions (never the
    current directory). Refuses a file, and a folder that holds other images (most often an input
    folder that the option took as its DIR)."""
    out = Path(value) if value else output_dir(model_dir, RECONSTRUCTIONS)
    if out.exists() and not out.is_dir():
        raise UserError(
            f"--save-reconstructions {out} is a file: give a directory (created if missing)"
        )
    if out.is_dir():
        others = [f for f in expand_paths([out]) if not f.name.endswith(OUTPUT_SUFFIXES)]
        if others:
            raise UserError(
                f"--save-reconstructions {out} holds images of its own ({others[0].name}, ...): "
                "give a new or empty directory, as --save-reconstructions=DIR"
            )
    return out


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="predict",
        description="Classify pictures of handwritten digits with an exported capsfast model. "
        "Any size, RGB or grey, dark-on-light or light-on-dark; digits are centred and scaled "
        "as MNIST's were. Folders are searched recursively for image files. Exit status: 0 all "
        "files predicted, 1 some files failed (each named on stderr), 2 nothing could be done.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument(
        "--model",
        required=True,
        help="exported model directory (model.safetensors + config.json), or the name of a "
        f"shipped model ({', '.join(shipped_models()) or 'none installed'}): an existing "
        "directory of that name wins",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line and file")
    parser.add_argument(
        "--save-reconstructions",
        nargs="?",
        const="",
        metavar="DIR",
        help="write each reconstruction (and the 28x28 input the model saw) as PNG into DIR "
        f"(default: MODEL/{RECONSTRUCTIONS}; a shipped model: ./NAME-{RECONSTRUCTIONS}); write "
        "it as --save-reconstructions=DIR",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument(
        "--routing", default="auto", choices=ROUTINGS, help="routing implementation"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Predict the digit in each image file (or folder of images); exit 1 if any file failed."""
    import json

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    recon_dir = None
    if args.save_reconstructions is not None:
        recon_dir = reconstruction_dir(args.save_reconstructions, args.model)
    model = load_for_inference(args.model, args.device, args.routing)
    if recon_dir is not None and not has_decoder(model):
        print(f"predict: note: {args.model} is the paper's baseline CNN, which has no decoder: "
              "it makes no reconstructions, so --save-reconstructions writes nothing",
              file=sys.stderr)  # fmt: skip
        recon_dir = None
    files = expand_paths(args.paths)
    if not files:
        raise UserError(
            "no image files found in the given folders: give image files, or folders that hold "
            f"{', '.join(sorted(IMAGE_SUFFIXES))} files"
        )
    if recon_dir is not None:
        recon_dir.mkdir(parents=True, exist_ok=True)
    used_names: set[str] = set()
    failed = 0
    for r in predict_files(model, files, batch_size=args.batch_size):
        record = _record(r, recon_dir, used_names)
        failed += not r.ok
        if args.json:
            print(json.dumps(record), flush=True)
        elif r.ok:
            print(prediction_line(r), flush=True)
        else:
            print(f"predict: error: {r.path}: {r.error}", file=sys.stderr, flush=True)
    if failed and not args.json:
        print(f"predict: {failed} of {len(files)} files failed", file=sys.stderr)
    return 1 if failed else 0


def _record(r, recon_dir: Path | None, used_names: set[str]) -> dict:
    """One file's result as --json prints it; its reconstruction written under a name no other
    file of this call took (two folders may hold the same file name)."""
    record: dict = {"path": str(r.path)}
    if not r.ok:
        return {**record, "error": r.error}
    record.update(label=r.label, class_name=r.class_name,
                  lengths=[round(v, 6) for v in r.lengths])  # fmt: skip
    if recon_dir is not None:
        name, n = r.path.stem, 1
        while name in used_names:
            n += 1
            name = f"{r.path.stem}-{n}"
        used_names.add(name)
        recon_path = recon_dir / f"{name}.recon.png"
        _save_png(r.reconstruction, recon_path)
        _save_png(r.input, recon_dir / f"{name}.input.png")
        record["reconstruction"] = str(recon_path)
    return record
