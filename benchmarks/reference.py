"""Wall-clock time to a given style-transfer loss: ours (the real Lightning product) against the PyTorch tutorial.

    python benchmarks/reference.py --size 256 --reference-steps 300 --repeats 3

The reference is written here after the PyTorch tutorial "Neural Transfer Using PyTorch": ContentLoss/StyleLoss
modules inserted into an ``nn.Sequential`` built from ``torchvision.models.vgg19().features`` with a Normalization
module first, ReLUs replaced by non-inplace ones, truncated after the last loss module, the tutorial's layers
(content ``conv_4``, style ``conv_1``..``conv_5``), Gram = F Fᵀ / (a·b·c·d), style weight 1e6, content weight 1,
``optim.LBFGS([input_img])`` with the closure that clamps, starting from the content image.

Both sides use the same weights (the real ImageNet VGG19 convolutions conv1_1..conv3_1 from
``../shared/models/vgg19_imagenet_conv1_1-conv3_1.pth``, which cover exactly the tutorial's five layers; seeded random
weights where that file is absent), the same images (``skimage:astronaut`` content, ``starry_night.jpg`` or
``skimage:gravel`` style, both through ``lightning_nst.core.images.load_image`` at ``--size``) and the same objective:
``1e6 · Σ_l mse(G_l, A_l) + mse(F, P)`` over conv1_1, conv1_2, conv2_1, conv2_2, conv3_1 (style) and conv2_2
(content). Ours is ``ImageOptimization`` + ``ImageTargets`` fitted by a ``lightning.Trainer`` with the product's
defaults (TensorBoard logger, snapshots every 50 steps, PNG/grid/summary.json written at the end of each stage).

The target is the reference's own loss after ``--reference-steps`` loss evaluations (the tutorial's 300). Each
implementation runs until its training loss first reaches the target; the clock runs from building the model
(loading weights and images) to that moment. The image that reached it is then scored by ONE definition
(``lightning_nst.core.losses.LayerStyleLoss`` + ``ContentLoss`` on ``VGG19Features``) at full size. Settings are
interleaved within each of ``--repeats`` rounds, and medians are printed. "steps" counts VGG forward+backward passes
(L-BFGS closure evaluations), as ``steps@px``. Not a test.

Settings of ours:

- ``L-BFGS``: the shipped recipe of ``configs/style_transfer_gram.yaml`` (L-BFGS lr 1, max_iter 1, history 50) at
  full size.
- ``coarse-to-fine``: the same, first ``--coarse-steps`` steps at ``--coarse-size`` (default half size, 1/4 of the
  pixels), then at full size from that result until the target. This is a recipe of existing options: stage 1 writes
  ``<output_dir>/<name>.png`` and stage 2 starts from it with ``model.init``::

      lightning-nst fit -c configs/style_transfer_gram.yaml --data.size 128 --trainer.max_steps 150 \\
          --trainer.callbacks.init_args.output_dir out/coarse
      lightning-nst fit -c configs/style_transfer_gram.yaml --data.size 256 --model.init out/coarse/gram.png

- ``Adam``: the product's default optimizer (Adam, lr 0.02) at full size, stopped at ``--adam-cap`` × the
  reference's steps if it has not reached the target by then.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn, optim
from torchvision.models.vgg import cfgs, make_layers

from lightning_nst import ImageOptimization, ImageTargets, ImageWriter, Objective, VGGConfig
from lightning_nst.core.images import load_image, save_image
from lightning_nst.core.losses import ContentLoss, LayerStyleLoss
from lightning_nst.core.vgg import VGG19Features

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.conftest import PARTIAL_WEIGHTS, shared_file  # noqa: E402  (the one place that knows where ../shared is)

STARRY_NIGHT = shared_file("data/style/starry_night.jpg")

# The tutorial's layers, conv_1 .. conv_5, by our names.
STYLE_LAYERS = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1"]
CONTENT_LAYER = "conv2_2"
STYLE_WEIGHT = 1e6
CONTENT_WEIGHT = 1.0


# -- the reference, after the PyTorch tutorial --------------------------------------------------------------------


class TutorialContentLoss(nn.Module):
    def __init__(self, target: Tensor) -> None:
        super().__init__()
        self.target = target.detach()

    def forward(self, input: Tensor) -> Tensor:
        self.loss = F.mse_loss(input, self.target)
        return input


def tutorial_gram_matrix(input: Tensor) -> Tensor:
    a, b, c, d = input.size()
    features = input.view(a * b, c * d)
    G = torch.mm(features, features.t())
    return G.div(a * b * c * d)


class TutorialStyleLoss(nn.Module):
    def __init__(self, target_feature: Tensor) -> None:
        super().__init__()
        self.target = tutorial_gram_matrix(target_feature).detach()

    def forward(self, input: Tensor) -> Tensor:
        G = tutorial_gram_matrix(input)
        self.loss = F.mse_loss(G, self.target)
        return input


class Normalization(nn.Module):
    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def forward(self, img: Tensor) -> Tensor:
        return (img - self.mean) / self.std


def get_style_model_and_losses(
    cnn: nn.Module, style_img: Tensor, content_img: Tensor
) -> tuple[nn.Sequential, list[TutorialStyleLoss], list[TutorialContentLoss]]:
    content_layers = ["conv_4"]
    style_layers = ["conv_1", "conv_2", "conv_3", "conv_4", "conv_5"]
    normalization = Normalization([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    content_losses, style_losses = [], []
    model = nn.Sequential(normalization)
    i = 0
    for layer in cnn.children():
        if isinstance(layer, nn.Conv2d):
            i += 1
            name = f"conv_{i}"
        elif isinstance(layer, nn.ReLU):
            name = f"relu_{i}"
            layer = nn.ReLU(inplace=False)
        elif isinstance(layer, nn.MaxPool2d):
            name = f"pool_{i}"
        else:
            raise RuntimeError(f"Unrecognized layer: {layer.__class__.__name__}")
        model.add_module(name, layer)
        if name in content_layers:
            target = model(content_img).detach()
            content_loss = TutorialContentLoss(target)
            model.add_module(f"content_loss_{i}", content_loss)
            content_losses.append(content_loss)
        if name in style_layers:
            target_feature = model(style_img).detach()
            style_loss = TutorialStyleLoss(target_feature)
            model.add_module(f"style_loss_{i}", style_loss)
            style_losses.append(style_loss)
    for i in range(len(model) - 1, -1, -1):
        if isinstance(model[i], TutorialContentLoss | TutorialStyleLoss):
            break
    return model[: (i + 1)], style_losses, content_losses


@dataclass
class Outcome:
    seconds: float | None  # to the target; None if not reached
    steps: str  # VGG passes, as "steps@px" per stage
    image: Tensor  # the image that reached the target (or the last one)
    losses: list[float] = field(default_factory=list)  # training loss per full-size evaluation


def run_reference(args: argparse.Namespace, target: float, max_evaluations: int) -> Outcome:
    """The tutorial's run_style_transfer, timed from loading weights and images to the first loss <= target."""
    started = time.perf_counter()
    cnn = make_layers(cfgs["E"])  # torchvision.models.vgg19().features, without building the classifier
    if args.weights != "random":
        cnn.load_state_dict(torch.load(args.weights, weights_only=True), strict=False)
    else:
        cnn.load_state_dict(VGG19Features(["conv3_1"], weights="random").trunk.state_dict(), strict=False)
    cnn.eval()
    # .contiguous(): the tutorial's transforms.ToTensor() gives contiguous tensors, which its L-BFGS needs
    content_img = load_image(args.content, args.size).contiguous()
    style_img = load_image(args.style, args.size).contiguous()
    input_img = content_img.clone()
    model, style_losses, content_losses = get_style_model_and_losses(cnn, style_img, content_img)
    input_img.requires_grad_(True)
    model.eval()
    model.requires_grad_(False)
    optimizer = optim.LBFGS([input_img])
    run = [0]
    reached: list[Any] = []
    losses: list[float] = []
    while run[0] < max_evaluations and not reached:

        def closure() -> Tensor:
            with torch.no_grad():
                input_img.clamp_(0, 1)
            optimizer.zero_grad()
            model(input_img)
            style_score = 0
            content_score = 0
            for sl in style_losses:
                style_score += sl.loss
            for cl in content_losses:
                content_score += cl.loss
            style_score *= STYLE_WEIGHT
            content_score *= CONTENT_WEIGHT
            loss = style_score + content_score
            loss.backward()
            run[0] += 1
            losses.append(loss.item())
            if not reached and loss.item() <= target:
                reached.extend([time.perf_counter(), run[0], input_img.detach().clone()])
            return style_score + content_score

        optimizer.step(closure)
    if reached:
        return Outcome(reached[0] - started, f"{reached[1]}@{args.size}", reached[2], losses)
    with torch.no_grad():
        input_img.clamp_(0, 1)
    return Outcome(None, f"{run[0]}@{args.size}", input_img.detach().clone(), losses)


# -- ours: the product ---------------------------------------------------------------------------------------------


class StopAtLoss(L.Callback):
    """Benchmark-only: stop fitting once the training loss is <= target; keep that image and the time."""

    def __init__(self, target: float | None) -> None:
        self.target = target
        self.reached: float | None = None
        self.steps = 0
        self.image: Tensor | None = None
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._before = pl_module.image.detach().clone()  # the image the step's loss is measured on

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = sum(row["total"] for row in pl_module._current.values())
        self.steps += 1
        self.losses.append(loss)
        if self.target is not None and self.reached is None and loss <= self.target:
            self.reached = time.perf_counter()
            self.image = self._before
            trainer.should_stop = True


def tutorial_objective() -> Objective:
    """The tutorial's loss as the product's objective: Gram style layers summed, content conv2_2."""
    return Objective(
        "gram",
        content_layers={CONTENT_LAYER: 1.0},
        content_weight=CONTENT_WEIGHT,
        style_layers=dict.fromkeys(STYLE_LAYERS, 1.0),  # summed over layers, as the tutorial does
        style_weight=STYLE_WEIGHT,
        statistic="gram",
    )


def fit(
    args: argparse.Namespace,
    size: int,
    steps: int,
    optimizer: Any,
    init: str,
    target: float | None,
    output_dir: Path,
    logs: Path,
) -> StopAtLoss:
    objective = tutorial_objective()
    model = ImageOptimization(
        [objective],
        vgg=VGGConfig(weights=str(args.weights)),
        init=init,
        optimizer=optimizer,
    )
    data = ImageTargets(content=args.content, style=[args.style], size=size)
    stop = StopAtLoss(target)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=TensorBoardLogger(logs, name="bench", default_hp_metric=False),
        callbacks=[stop, ImageWriter(output_dir=str(output_dir), snapshot_every=50)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    return stop


def lbfgs(params: Any) -> optim.Optimizer:
    """The optimizer of configs/style_transfer_gram.yaml."""
    return optim.LBFGS(params, lr=1.0, max_iter=1, history_size=50, line_search_fn=None)


def adam(params: Any) -> optim.Optimizer:
    """The product's default optimizer."""
    return optim.Adam(params, lr=0.02)


def run_ours(args: argparse.Namespace, setting: str, target: float, max_steps: int, folder: Path) -> Outcome:
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(dir=folder))
    stages: list[str] = []
    init = "content"
    optimizer = adam if setting == "Adam" else lbfgs
    if setting == "coarse-to-fine":
        fit(args, args.coarse_size, args.coarse_steps, lbfgs, init, None, work / "coarse", work / "logs")
        stages.append(f"{args.coarse_steps}@{args.coarse_size}")
        init = str(work / "coarse" / "gram.png")
    stop = fit(args, args.size, max_steps, optimizer, init, target, work / "full", work / "logs")
    stages.append(f"{stop.steps}@{args.size}")
    seconds = stop.reached - started if stop.reached is not None else None
    image = stop.image if stop.image is not None else load_image(work / "full" / "gram.png")
    return Outcome(seconds, " + ".join(stages), image, stop.losses)


# -- one loss definition for both ---------------------------------------------------------------------------------


class Score:
    """``1e6 · Σ_l mse(G_l, A_l) + mse(F, P)`` with lightning_nst's loss modules, at full size."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.vgg = VGG19Features([*STYLE_LAYERS, CONTENT_LAYER], weights=str(args.weights))
        style = self.vgg(load_image(args.style, args.size))
        content = self.vgg(load_image(args.content, args.size))
        self.style = LayerStyleLoss(
            {layer: style[layer] for layer in STYLE_LAYERS}, "gram", dict.fromkeys(STYLE_LAYERS, 1.0)
        )
        self.content = ContentLoss(content[CONTENT_LAYER])

    @torch.no_grad()
    def __call__(self, image: Tensor) -> float:
        features = self.vgg(image.clamp(0, 1))
        return (STYLE_WEIGHT * self.style(features) + CONTENT_WEIGHT * self.content(features[CONTENT_LAYER])).item()


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="longer edge of content, style and result")
    parser.add_argument("--reference-steps", type=int, default=300, help="the target is the reference's loss here")
    parser.add_argument("--coarse-size", type=int, default=None, help="stage 1 size (default: size // 2)")
    parser.add_argument("--coarse-steps", type=int, default=150, help="L-BFGS steps at the coarse size")
    parser.add_argument("--adam-cap", type=float, default=2.0, help="Adam stops at this x reference steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=["L-BFGS", "coarse-to-fine", "Adam"])
    parser.add_argument("--content", default="skimage:astronaut")
    parser.add_argument("--style", default=str(STARRY_NIGHT) if STARRY_NIGHT else "skimage:gravel")
    parser.add_argument("--weights", default=str(PARTIAL_WEIGHTS) if PARTIAL_WEIGHTS else "random")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    args.coarse_size = args.coarse_size or args.size // 2
    if args.threads:
        torch.set_num_threads(args.threads)
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"1-minute load average at start: {load}")
    # The tutorial needs style and content of the same shape: both sides get the same two PNGs, the style resized
    # to the content's shape.
    images = Path(tempfile.mkdtemp(prefix="nst-reference-"))
    sources = args.content, args.style
    content = load_image(args.content, args.size)
    style = torch.nn.functional.interpolate(
        load_image(args.style), size=content.shape[-2:], mode="bilinear", antialias=True
    )
    args.content, args.style = str(save_image(content, images / "content.png")), str(images / "style.png")
    save_image(style, args.style)
    score = Score(args)

    # The target: the reference's training loss after --reference-steps evaluations.
    calibration = run_reference(args, float("-inf"), args.reference_steps)
    target = calibration.losses[args.reference_steps - 1]
    initial = calibration.losses[0]
    check = score(load_image(args.content, args.size))
    if abs(check - initial) > 1e-4 * abs(initial):
        sys.exit(f"the two loss definitions disagree on the content image: {check} != {initial}")
    print(f"initial loss {initial:.4g} (reference) = {check:.4g} (one definition); target {target:.4g}")

    settings = ["reference (tutorial)", *args.settings]
    results: dict[str, list[Outcome]] = {setting: [] for setting in settings}
    cap = max(args.reference_steps * 3, 1)
    with tempfile.TemporaryDirectory() as temporary:
        for _ in range(args.repeats):
            for setting in settings:
                if setting == "reference (tutorial)":
                    outcome = run_reference(args, target, cap)
                else:
                    limit = int(args.adam_cap * args.reference_steps) if setting == "Adam" else cap
                    outcome = run_ours(args, setting, target, limit, Path(temporary))
                results[setting].append(outcome)
                print(f"  {setting}: {outcome.seconds} s, steps {outcome.steps}", flush=True)

    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"1-minute load average at end: {load}")
    print(
        f"\nTime to the reference's loss after {args.reference_steps} evaluations ({target:.4g}; initial "
        f"{initial:.4g}), {args.size} px, {torch.get_num_threads()} threads, medians of {args.repeats} rounds"
    )
    print(f"content {sources[0]}, style {sources[1]} (resized to the content's shape), VGG weights {args.weights}")
    print(f"{'implementation / setting':<34} {'steps':>16} {'s to target':>12} {'final loss':>11} {'x faster':>9}")
    base = statistics.median(o.seconds for o in results[settings[0]])
    for setting in settings:
        outcomes = results[setting]
        reached = [o.seconds for o in outcomes if o.seconds is not None]
        final = statistics.median(score(o.image) for o in outcomes)
        if len(reached) == len(outcomes):
            seconds = statistics.median(reached)
            text, ratio = f"{seconds:.2f}", f"{base / seconds:.2f}"
        else:
            text, ratio = "not reached", "-"
        name = setting if setting != "coarse-to-fine" else f"coarse-to-fine ({args.coarse_size} px first)"
        name = name if setting == settings[0] else f"ours, {name}"
        print(f"{name:<34} {outcomes[len(outcomes) // 2].steps:>16} {text:>12} {final:>11.4g} {ratio:>9}")


if __name__ == "__main__":
    main()
