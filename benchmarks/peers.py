"""The peers pystiche and pastiche on the common settings of benchmarks/reference.py, scored by one loss definition.

    pip install --no-deps --target peers pystiche==1.0.1 pastiche==1.6.0   # once, into a folder of your choice
    PYTHONPATH=$PWD:peers python benchmarks/peers.py --size 64 --steps 20
    PYTHONPATH=$PWD:peers python benchmarks/peers.py --size 128 --steps 60 --layer-weights common

Neither peer is a dependency: ``available()`` reads their versions from the installed metadata and each peer is
imported only inside its ``run_*`` function. ``time_to_quality.py`` calls ``run_pystiche`` / ``run_pastiche`` with
its ``args`` (``content``/``style`` image files of one shape, ``size``, ``weights``; optional ``device``, ``cap``,
``max_steps``, ``score_every``, ``layer_weights``), the target loss, the reference's wall time ``budget`` and
``score`` (``reference.Score``). Each returns a :class:`PeerRun`: ``time_to_quality.Run``'s fields (same names and
order; ``run.as_run(Run)`` converts) plus the peer's own initial loss, the common initial score and the trace of
common scores.

The common settings, as each peer is given them:

- Weights: the SAME torchvision VGG19 ``features`` state_dict (``--weights``: the partial ImageNet file, or the
  seeded random trunk of ``VGG19Features(weights="random")`` as the reference uses). pystiche: loaded into its
  ``vgg19_multi_layer_encoder(pretrained=False)`` (torchvision's ``vgg19().features`` renamed conv1_1, relu1_1, ...)
  with its own ``load_state_dict`` (keys prefixed ``features.``); its internal preprocessing is torchvision's
  ImageNet mean/std, as ours. pastiche: its ``VGG19`` class is built with our convolutions in place of its quantized
  caffe weights (``from_quantized_bin`` patched for the run), and its first convolution is wrapped by a module that
  maps pastiche's input convention (BGR, 0-255, caffe mean subtracted, no std) exactly back to RGB [0, 1] with
  torchvision's mean/std, then applies our conv1_1 unchanged. Folding that affine map into conv1_1's weights and bias
  would be wrong at the borders (zero padding then pads a different value), so the wrapper is used instead. Layers
  pastiche needs but the partial file lacks (conv3_2..conv5_4) get torchvision's random init; they are never
  run (its forward stops at the deepest requested layer).
- Images: the content and style files (style already at the content's shape). pystiche gets them through
  ``lightning_nst.core.images.load_image``; pastiche reads them with its own ``load_image`` at ``size=(H, W)`` (the same
  8-bit pixels, as BGR 0-255 minus the caffe mean).
- Layers: style conv1_1, conv1_2, conv2_1, conv2_2, conv3_1 (pastiche: block1_conv1 ... block3_conv1), content
  conv2_2 (block2_conv2); conv outputs before the ReLU in both, as the tutorial's. Style weight 1e6, content 1.
  Start from the content image. Max pooling. No total variation term.
- Per-layer weights (``layer_weights``): "own" (default) passes the common numbers literally: every style layer
  1.0 (pystiche ``layer_weights="sum"``, pastiche ``style_layer_weights=[1.0] * 5``), content layer 1.0 (pastiche
  ``content_layer_weights=[1.0]``; its default would be 0.01), style weight 1e6 (pystiche ``score_weight``,
  pastiche ``style_weights=[1e6]``), content weight 1. Both peers normalise the Gram matrix by H·W where the tutorial
  divides by C·H·W, so each peer's own loss is ``1e6 · Σ_l C_l² · mse(G_l, A_l) + mse(F, P)`` in the tutorial's
  terms: conv3_1 counts 16x more against conv1_1 than in the common loss, and style 4096-65536x more against
  content. That is the loss a user of the peer gets with these numbers, and it is what the peer optimises.
  "common" sets the per-layer weights to 1/C_l² instead, so that each peer optimises exactly the common loss (the
  initial losses then agree to float precision - a check that weights, layers and images match).
- Optimiser: each peer's own default L-BFGS, ``LBFGS(lr=1, max_iter=1)`` (history 100, no line search) - one VGG
  forward+backward per step; the tutorial uses ``LBFGS()`` (max_iter 20, history 100, no line search) with a
  clamping closure. Neither peer clamps the image during the fit; the score clamps to [0, 1] (as both peers do
  when they write the image), so a peer's own loss can reach the target while its score does not.
- pystiche runs through its own ``optim.image_optimization`` (``quiet=True``), called for ``score_every`` steps at
  a time with one persistent optimizer. As in pystiche's examples the encoder is not frozen, so each backward also
  computes VGG weight gradients (a cost a user of it pays); pastiche freezes its VGG. pystiche 1.0.1 imports
  ``model_urls`` from torchvision modules that no longer have it; this module puts placeholder dicts there before
  importing it (no weights are downloaded: ``pretrained=False``). pastiche computes its loss terms on the CPU
  (``.to("cpu")``), which costs transfers on a GPU.

Progress is the common ``score(image) -> float`` on the peer's current image (RGB [0, 1], on the CPU) every
``score_every`` steps (default 1 up to 128 px, else 5), with the scoring time subtracted from the clock; the clock
runs from building the model (loading weights and images). ``to_target``: the first time the score is <= the target
(so with score_every > 1 it is late by up to score_every - 1 steps); ``at_reference``: the best-scored image seen
within ``budget`` seconds. A run stops once it has reached the target and the budget has passed, at ``cap`` x the
budget, or at ``max_steps`` steps. Not a test.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.vgg import cfgs, make_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import (  # noqa: E402  (benchmarks/ is no package)
    CONTENT_LAYER,
    CONTENT_WEIGHT,
    PARTIAL_WEIGHTS,
    STARRY_NIGHT,
    STYLE_LAYERS,
    STYLE_WEIGHT,
    Score,
    run_reference,
)

from lightning_nst.core.images import load_image, save_image  # noqa: E402
from lightning_nst.core.vgg import VGG19Features  # noqa: E402

PEERS = ("pystiche", "pastiche")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # pastiche.VGG_MEAN
CHANNELS = {"conv1_1": 64, "conv1_2": 64, "conv2_1": 128, "conv2_2": 128, "conv3_1": 256}
PASTICHE_NAMES = {"conv1_1": "block1_conv1", "conv1_2": "block1_conv2", "conv2_1": "block2_conv1",
                  "conv2_2": "block2_conv2", "conv3_1": "block3_conv1"}  # fmt: skip


def available() -> dict[str, str | None]:
    """Each peer's installed version, or None; reads package metadata only, imports nothing."""
    versions: dict[str, str | None] = {}
    for peer in PEERS:
        try:
            versions[peer] = importlib.metadata.version(peer)
        except importlib.metadata.PackageNotFoundError:
            versions[peer] = None
    return versions


@dataclass
class PeerRun:
    """``time_to_quality.Run``'s fields, in its order, plus what the checks need.

    Not a subclass: importing time_to_quality here would be circular once it imports this module.
    ``run.as_run(Run)`` gives the plain ``Run``.
    """

    to_target: float | None  # seconds from building the model, None if not reached
    steps: str  # "<steps to target> (ran <steps>@<px>)" or "ran <steps>@<px>"
    at_reference: Tensor | None  # the best-scored image (RGB [0, 1], CPU) within the budget
    seconds: float  # the whole run, scoring excluded
    stages: dict[int, int] = field(default_factory=dict)
    peer_initial: float = math.nan  # the peer's own loss on the start image
    initial_score: float = math.nan  # the common score of the start image
    scores: list[tuple[int, float, float]] = field(default_factory=list)  # (steps, seconds, common score)

    def as_run(self, run_class: type) -> Any:
        """This run as ``run_class(to_target, steps, at_reference, seconds, stages)``."""
        return run_class(self.to_target, self.steps, self.at_reference, self.seconds, self.stages)


def state_dict(args: argparse.Namespace) -> dict[str, Tensor]:
    """The torchvision ``features`` state_dict both sides get: the weights file, or the reference's random trunk."""
    if args.weights != "random":
        return torch.load(args.weights, weights_only=True)
    return VGG19Features(["conv3_1"], weights="random").trunk.state_dict()


def style_layer_weights(args: argparse.Namespace) -> list[float]:
    """Per style layer: 1.0 ("own"), or 1/C² so the peer's H·W-normalised Gram loss is the common one ("common")."""
    if getattr(args, "layer_weights", "own") == "common":
        return [1.0 / CHANNELS[layer] ** 2 for layer in STYLE_LAYERS]
    return [1.0] * len(STYLE_LAYERS)


class _Clock:
    """Seconds since ``started`` without the time spent in ``timed`` calls (scoring, checks)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.started = time.perf_counter()
        self.excluded = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter() - self.started - self.excluded

    def timed(self, function: Callable[[], Any]) -> Any:
        self.sync()
        begin = time.perf_counter()
        try:
            return function()
        finally:
            self.excluded += time.perf_counter() - begin


def _drive(
    args: argparse.Namespace,
    clock: _Clock,
    step: Callable[[int], None],
    image: Callable[[], Tensor],
    peer_initial: float,
    target: float,
    budget: float,
    score: Callable[[Tensor], float],
) -> PeerRun:
    """Run ``step(k)`` (k L-BFGS steps of the peer) and score its image every k steps, as the module doc says."""
    every = getattr(args, "score_every", None) or (1 if args.size <= 128 else 5)
    max_steps = getattr(args, "max_steps", 2000)
    deadline = getattr(args, "cap", 3.0) * budget
    initial = clock.timed(lambda: score(image()))
    steps, reached, reached_steps = 0, None, 0
    start = clock.now()
    best, best_image = (initial, clock.timed(image)) if start <= budget else (math.inf, None)
    trace: list[tuple[int, float, float]] = [(0, start, initial)]
    while steps < max_steps:
        k = min(every, max_steps - steps)
        step(k)
        steps += k
        now = clock.now()
        current = clock.timed(image)
        value = clock.timed(lambda image=current: score(image))
        trace.append((steps, now, value))
        if now <= budget and value < best:
            best, best_image = value, current
        if reached is None and value <= target:
            reached, reached_steps = now, steps
        if (reached is not None and now >= budget) or now > deadline:
            break
    text = f"{reached_steps} (ran {steps}@{args.size})" if reached is not None else f"ran {steps}@{args.size}"
    return PeerRun(reached, text, best_image, clock.now(), {args.size: steps}, peer_initial, initial, trace)


# -- pystiche ------------------------------------------------------------------------------------------------------


def _import_pystiche() -> Any:
    # pystiche 1.0.1 does `from torchvision.models.alexnet import model_urls` (and vgg's), which torchvision dropped
    # in 0.15; placeholders let it import. Nothing is downloaded: the encoder is built with pretrained=False.
    for name, archs in (
        ("alexnet", ["alexnet"]),
        ("vgg", [f"vgg{n}{bn}" for n in (11, 13, 16, 19) for bn in ("", "_bn")]),
    ):
        module = importlib.import_module(f"torchvision.models.{name}")  # not `import ... as`: the function shadows it
        if not hasattr(module, "model_urls"):
            module.model_urls = dict.fromkeys(archs, "")
    return importlib.import_module("pystiche")


def run_pystiche(args: argparse.Namespace, target: float, budget: float, score: Callable[[Tensor], float]) -> PeerRun:
    """pystiche's multi-layer VGG19 encoder with our weights, its Gram/feature losses and image_optimization."""
    pystiche = _import_pystiche()
    from pystiche import enc, loss, optim

    device = torch.device(getattr(args, "device", "cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated" from pystiche's model builder
        clock = _Clock(device)
        mle = enc.vgg19_multi_layer_encoder(pretrained=False, internal_preprocessing=True, allow_inplace=False)
    keys = mle.load_state_dict({f"features.{key}": value for key, value in state_dict(args).items()}, strict=False)
    if keys.unexpected_keys or any(key.split(".")[0] in CHANNELS for key in keys.missing_keys):
        raise RuntimeError(f"pystiche: our weights did not load: {keys}")
    content_loss = loss.FeatureReconstructionLoss(mle.extract_encoder(CONTENT_LAYER), score_weight=CONTENT_WEIGHT)
    style_loss = loss.MultiLayerEncodingLoss(
        mle,
        STYLE_LAYERS,
        lambda encoder, layer_weight: loss.GramLoss(encoder, score_weight=layer_weight),
        layer_weights=style_layer_weights(args),
        score_weight=STYLE_WEIGHT,
    )
    criterion = loss.PerceptualLoss(content_loss, style_loss).to(device)
    # .contiguous(): pystiche's own read_image gives contiguous tensors, which torch's L-BFGS needs
    content = load_image(args.content, args.size).contiguous().to(device)
    criterion.set_content_image(content)
    criterion.set_style_image(load_image(args.style, args.size).to(device))
    image = content.clone()
    optimizer = optim.default_image_optimizer(image)

    def own_loss() -> float:
        value = float(criterion(image))
        mle.clear_cache()  # its encodings of `image` are cached until a backward clears them
        return value

    peer_initial = clock.timed(own_loss)

    def step(k: int) -> None:
        optim.image_optimization(image, criterion, optimizer=optimizer, num_steps=k, quiet=True)

    del pystiche
    return _drive(args, clock, step, lambda: image.detach().to("cpu", copy=True), peer_initial, target, budget, score)


# -- pastiche ------------------------------------------------------------------------------------------------------


class CaffeToTorchvision(nn.Module):
    """pastiche's input (BGR, 0-255, caffe mean subtracted) -> torchvision's (RGB [0, 1], ImageNet mean/std)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("caffe_mean", torch.tensor(CAFFE_MEAN_BGR[::-1]).view(1, 3, 1, 1))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        rgb = (x.flip(1) + self.caffe_mean) / 255
        return (rgb - self.mean) / self.std


def pastiche_to_rgb(x: Tensor) -> Tensor:
    """pastiche's image tensor -> RGB [0, 1] (unclamped), what the score takes."""
    return (x.detach().cpu().flip(1) + torch.tensor(CAFFE_MEAN_BGR[::-1]).view(1, 3, 1, 1)) / 255


def _pastiche_vgg(vgg19_class: Any, weights: dict[str, Tensor]) -> Any:
    """pastiche's VGG19 with our torchvision convolutions, its first one behind ``CaffeToTorchvision``."""
    trunk = make_layers(cfgs["E"])  # torchvision's features: the keys of `weights`, and shapes for the rest
    trunk.load_state_dict(weights, strict=False)
    convs = [layer for layer in trunk if isinstance(layer, nn.Conv2d)]
    fields = vgg19_class.Weights._fields  # block1_conv1 ... block5_conv4, the order of torchvision's convolutions
    # Layers beyond the partial file keep torchvision's random init; pastiche's forward never runs them.
    tensors = {name: (conv.weight.data, conv.bias.data) for name, conv in zip(fields, convs, strict=True)}
    model = vgg19_class(vgg19_class.Weights(**tensors))
    model.block1_conv1 = nn.Sequential(CaffeToTorchvision(), model.block1_conv1)
    return model


def run_pastiche(args: argparse.Namespace, target: float, budget: float, score: Callable[[Tensor], float]) -> PeerRun:
    """pastiche's PasticheArtist on our weights (through a thin input wrapper), its loss and its L-BFGS."""
    module = importlib.import_module("pastiche.pastiche")
    device = torch.device(getattr(args, "device", "cpu"))
    original = module.VGG19
    clock = _Clock(device)
    weights = state_dict(args)

    class OurVGG19(original):  # type: ignore[misc, valid-type]
        @staticmethod
        def from_quantized_bin(path: str, pooling: str = "max") -> Any:
            return _pastiche_vgg(original, weights)

    height, width = load_image(args.content, args.size).shape[-2:]  # the files' shape (pastiche resizes to it)
    module.VGG19 = OurVGG19  # PasticheArtist loads its quantized caffe weights by this name; restored below
    try:
        artist = module.PasticheArtist(
            args.content,
            [args.style],
            optimizer="lbfgs",
            device=str(device),
            content_layers=[PASTICHE_NAMES[CONTENT_LAYER]],
            style_layers=[PASTICHE_NAMES[layer] for layer in STYLE_LAYERS],
            content_layer_weights=[1.0],
            style_layer_weights=style_layer_weights(args),
            content_weight=CONTENT_WEIGHT,
            style_weights=[STYLE_WEIGHT],
            tv_weight=0.0,
            size=(height, width),
            style_size=(height, width),
        )
    finally:
        module.VGG19 = original
    if tuple(artist.pastiche.shape[-2:]) != (height, width):
        raise RuntimeError(f"pastiche: image {tuple(artist.pastiche.shape)} != {(height, width)}")

    def step(k: int) -> None:
        for _ in range(k):
            artist.draw()

    return _drive(args, clock, step, lambda: pastiche_to_rgb(artist.pastiche), artist.loss, target, budget, score)


RUNNERS = {"pystiche": run_pystiche, "pastiche": run_pastiche}


# -- smoke mode and per-step timing --------------------------------------------------------------------------------


def _reference_per_step(args: argparse.Namespace, short: int, long: int) -> float:
    """The tutorial reference's seconds per evaluation: the difference of two runs, so setup cancels."""
    seconds = []
    for evaluations in (short, long):
        started = time.perf_counter()
        run_reference(args, float("-inf"), evaluations)
        seconds.append(time.perf_counter() - started)
    return (seconds[1] - seconds[0]) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="longer edge of content, style and result")
    parser.add_argument("--steps", type=int, default=20, help="L-BFGS steps (VGG passes) per peer")
    parser.add_argument("--content", default="skimage:astronaut")
    parser.add_argument("--style", default=str(STARRY_NIGHT) if STARRY_NIGHT else "skimage:gravel")
    parser.add_argument("--weights", default=str(PARTIAL_WEIGHTS) if PARTIAL_WEIGHTS else "random")
    parser.add_argument("--layer-weights", choices=["own", "common"], default="own", help="see the module doc")
    parser.add_argument("--score-every", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference", action="store_true", help="also time the tutorial reference per step")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    args.max_steps, args.cap = args.steps, math.inf
    print(f"peers: {available()}; {args.size} px, {args.steps} steps, layer weights {args.layer_weights}, "
          f"{torch.get_num_threads()} threads, load {Path('/proc/loadavg').read_text().split()[0]}")  # fmt: skip
    images = Path(tempfile.mkdtemp(prefix="nst-peers-"))
    content = load_image(args.content, args.size)
    style = nn.functional.interpolate(load_image(args.style), size=content.shape[-2:], mode="bilinear", antialias=True)
    args.content, args.style = str(save_image(content, images / "content.png")), str(images / "style.png")
    save_image(style, args.style)
    score = Score(args)
    failed = False
    for peer, version in available().items():
        if version is None:
            print(f"{peer}: not installed")
            continue
        run = RUNNERS[peer](args, float("-inf"), math.inf, score)
        final = run.scores[-1][2]
        steps = [s for s, _, _ in run.scores]
        seconds = [t for _, t, _ in run.scores]
        per_step = (seconds[-1] - seconds[1]) / (steps[-1] - steps[1]) if len(steps) > 2 else math.nan
        verdict = "falls" if final < run.initial_score else "DOES NOT FALL"
        print(f"{peer} {version}: own initial loss {run.peer_initial:.6g}, common initial score "
              f"{run.initial_score:.6g} (own / common = {run.peer_initial / run.initial_score:.4g}); "
              f"common score after {steps[-1]} steps {final:.6g} ({verdict}); "
              f"{per_step:.4f} s per step after the first, setup + first step {seconds[1]:.2f} s")  # fmt: skip
        failed |= not final < run.initial_score
    if args.reference:
        # The tutorial's L-BFGS (max_iter 20) evaluates in steps of 20, so both runs are whole steps of it.
        long = 20 * max(2, -(-args.steps // 20))
        print(f"tutorial reference: {_reference_per_step(args, 20, long + 20):.4f} s per evaluation")
    if failed:
        sys.exit("a peer's optimisation did not lower the common score")


if __name__ == "__main__":
    main()
