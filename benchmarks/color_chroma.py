"""Chroma difference from the content image of each colour mode (issue 16): keep, luminance, match, histogram.

    python benchmarks/color_chroma.py --weights ../shared/models/vgg19_imagenet_conv1_1-conv3_1.pth --size 128

Not a test. One sweep (the four modes as objectives of one run, each with its own image and L-BFGS), Gram style
loss on relu1_1..relu3_1 (what the partial weights hold), content relu3_1, started from the content image. Prints
the mean absolute CbCr difference from the content (YCbCr, 0-255) of each saved result, the largest gap of its RGB
channel means and covariance entries from the content's (0-255 scale), and its style and content loss.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import lightning as L
import torch

from lightning_nst import ImageOptimization, ImageTargets, ImageWriter, Objective, VGGConfig
from lightning_nst.core.color import COLOR_MODES, chroma_difference
from lightning_nst.core.images import load_image


def colour_gap(image: torch.Tensor, content: torch.Tensor) -> tuple[float, float]:
    """Largest difference of RGB channel means and of RGB covariance entries from the content's, on 0-255."""
    stats = []
    for pixels in (image.double().flatten(2)[0] * 255, content.double().flatten(2)[0] * 255):
        centred = pixels - pixels.mean(1, keepdim=True)
        stats.append((pixels.mean(1), centred @ centred.T / pixels.shape[1]))
    return (stats[0][0] - stats[1][0]).abs().max().item(), (stats[0][1] - stats[1][1]).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="random")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--content", default="sample:astronaut")
    parser.add_argument("--style", default="sample:immunohistochemistry")
    parser.add_argument("--style-weight", type=float, default=1e6)
    args = parser.parse_args()
    objectives = [
        Objective(
            mode,
            content_layers=["relu3_1"],
            style_layers=["relu1_1", "relu2_1", "relu3_1"],
            style_weight=args.style_weight,
            color=mode,
        )  # fmt: skip
        for mode in COLOR_MODES
    ]
    optimizer = partial(torch.optim.LBFGS, lr=1.0, max_iter=1, history_size=50)
    model = ImageOptimization(objectives, vgg=VGGConfig(weights=args.weights), init="content", optimizer=optimizer)
    with tempfile.TemporaryDirectory() as folder:
        trainer = L.Trainer(
            max_steps=args.steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[ImageWriter(output_dir=folder, snapshot_every=0)],
        )  # fmt: skip
        trainer.fit(model, ImageTargets(content=args.content, style=[args.style], size=args.size))
        content = load_image(args.content, args.size)
        style = load_image(args.style, args.size)
        print(f"weights {args.weights}, {args.size} px, {args.steps} L-BFGS steps, {args.content} / {args.style}")
        gap = colour_gap(style, content)
        print(
            f"style image: chroma difference {chroma_difference(style, content):.2f}, "
            f"mean/cov gap {gap[0]:.1f}/{gap[1]:.0f}"
        )
        print(
            f"{'mode':<10} {'chroma diff':>12} {'mean gap':>9} {'cov gap':>8} {'style loss':>11} {'content loss':>13}"
        )
        for objective, result in zip(objectives, model.results(), strict=True):
            saved = load_image(Path(folder) / f"{objective.name}.png")
            style_loss = sum(v for k, v in result.final_loss.items() if k.startswith("style"))
            content_loss = sum(v for k, v in result.final_loss.items() if k.startswith("content"))
            mean_gap, cov_gap = colour_gap(saved, content)
            print(
                f"{objective.name:<10} {chroma_difference(saved, content):>12.2f} {mean_gap:>9.1f} {cov_gap:>8.0f} "
                f"{style_loss:>11.4g} {content_loss:>13.4g}"
            )


if __name__ == "__main__":
    main()
