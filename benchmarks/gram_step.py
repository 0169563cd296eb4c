"""One evaluation of the tutorial's style transfer loss, the Gram matrices' backward and the trunk's layout varied.

An evaluation is what one L-BFGS step of ``lightning-nst stylize`` costs: VGG19 to conv3_1 (the tutorial's layers
of ``benchmarks/reference.py``), the float32 Gram matrices of conv1_1..conv3_1 against a style image's, the content
term at conv2_2, and the backward pass to the image. Settings, in float32 and under bf16 autocast:

- ``autograd, NCHW``: the Gram matrix as ``F @ F.T / n`` with autograd's matmul backward (two products and a sum),
  the trunk in NCHW (what the product ran before);
- ``one product, NCHW``: :func:`lightning_nst.core.losses.gram_matrix` (one product, ``(G' + G'.T) @ F``, in bf16
  for bf16 features) on an NCHW trunk;
- ``one product, channels_last``: the same on the ``channels_last`` trunk that ``VGG19Features`` runs now;
- ``..., ContentLoss``: with :class:`lightning_nst.core.losses.ContentLoss` for the content term (its gradient keeps
  the features' layout and dtype) instead of autograd's ``(F.float() - P).square().mean()`` (the rows before it).

Alternately in one process, median of ``--repeats`` after a warm-up round; the losses of every setting are checked
equal to the first's (float32 to 1e-4 relative, bf16 to 1e-2).

    python benchmarks/gram_step.py --size 256 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from lightning_nst.core.images import load_image
from lightning_nst.core.losses import ContentLoss, gram_matrix
from lightning_nst.core.vgg import VGG19Features

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import PARTIAL_WEIGHTS  # noqa: E402

STYLE_LAYERS = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1"]
CONTENT_LAYER = "conv2_2"


def autograd_gram(features: Tensor) -> Tensor:
    """The Gram matrix as before: float32 ``F @ F.T / n``, autograd's own backward."""
    with torch.autocast(features.device.type, enabled=False):
        flat = features.float().flatten(2)
        return flat @ flat.transpose(1, 2) / flat.shape[1:].numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--weights", default=str(PARTIAL_WEIGHTS) if PARTIAL_WEIGHTS else "random")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vgg = VGG19Features(STYLE_LAYERS, weights=args.weights)
    nchw = VGG19Features(STYLE_LAYERS, weights=args.weights, channels_last=False)
    content, style = load_image("skimage:astronaut", args.size), load_image("skimage:gravel", args.size)
    with torch.no_grad():
        targets = {k: gram_matrix(v) for k, v in vgg(style).items()}
        content_target = vgg(content)[CONTENT_LAYER].float()
    image = content.clone().contiguous().requires_grad_(True)

    content_module = ContentLoss(content_target)

    def autograd_content(features: Tensor) -> Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return (features.float() - content_target).square().mean()

    def evaluation(gram: Callable[[Tensor], Tensor], channels_last: bool, bf16: bool,
                   content: Callable[[Tensor], Tensor] = autograd_content) -> Callable[[], float]:  # fmt: skip
        def run() -> float:
            image.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                features = (vgg if channels_last else nchw)(image)
                style_loss = sum((gram(features[k]) - targets[k]).square().mean() for k in STYLE_LAYERS)
                loss = 1e6 * style_loss + content(features[CONTENT_LAYER]).sum()
            loss.backward()
            return float(loss.detach())

        return run

    settings: dict[str, Callable[[], float]] = {}
    for bf16 in (False, True):
        precision = "bf16 autocast" if bf16 else "float32"
        settings[f"{precision}, autograd, NCHW"] = evaluation(autograd_gram, False, bf16)
        settings[f"{precision}, one product, NCHW"] = evaluation(gram_matrix, False, bf16)
        settings[f"{precision}, one product, channels_last"] = evaluation(gram_matrix, True, bf16)
        settings[f"{precision}, one product, channels_last, ContentLoss"] = evaluation(
            gram_matrix, True, bf16, content_module
        )
    times: dict[str, list[float]] = {name: [] for name in settings}
    losses: dict[str, float] = {}
    for _ in range(args.repeats + 1):
        for name, step in settings.items():
            started = time.perf_counter()
            losses[name] = step()
            times[name].append(time.perf_counter() - started)
    print(f"tutorial loss, VGG19 to conv3_1 at {args.size} px, {args.threads} threads, weights {args.weights}")
    print("| setting | s per evaluation | × the first | loss |")
    print("|---|---|---|---|")
    base = statistics.median(times[next(iter(times))][1:])
    for name, values in times.items():
        median = statistics.median(values[1:])
        reference = losses["bf16 autocast, autograd, NCHW" if name.startswith("bf16") else "float32, autograd, NCHW"]
        tolerance = 1e-2 if name.startswith("bf16") else 1e-4
        if abs(losses[name] - reference) > tolerance * abs(reference):
            sys.exit(f"{name}: loss {losses[name]} differs from {reference}")
        print(f"| {name} | {median:.4f} | {base / median:.2f} | {losses[name]:.6g} |")


if __name__ == "__main__":
    main()
