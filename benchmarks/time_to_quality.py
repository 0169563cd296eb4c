"""Wall time to the PyTorch tutorial's loss, per image parameterisation, optimizer and schedule, side by side.

    OMP_NUM_THREADS=1 python benchmarks/time_to_quality.py --sizes 256 --repeats 1
    python benchmarks/time_to_quality.py --sizes 256 512 --variants "pixels L-BFGS" "fourier Adam" "c2f-2 L-BFGS"

The reference, the images, the weights and the ONE loss definition are those of ``benchmarks/reference.py`` (the
tutorial's ``nn.Sequential`` with inserted loss modules and ``optim.LBFGS([input_img])``, style conv1_1..conv3_1,
content conv2_2, style weight 1e6, starting from the content image; the real partial ImageNet weights
``../shared/models/vgg19_imagenet_conv1_1-conv3_1.pth`` or ``--weights random``). The target is the reference's own
training loss after ``--reference-steps`` evaluations (300, the tutorial's). Every variant is a real Lightning fit of
``ImageOptimization`` + ``ImageTargets`` (TensorBoard logger, ``ImageWriter``); the clock runs from building the
model to the step whose loss first reaches the target, counted only at the output size (coarse scales do not
count). Each run goes on until it reached the target and the reference's wall time has passed (or
``--cap`` × the reference's time), so the same run also gives the loss at the reference's wall time: the best image
seen by then, scored by the one definition at full size.

A variant is the contract's ``ImageOptimization`` keys plus an optimizer (``VARIANTS``):
``parameterization`` (pixels | laplacian | fourier), ``scales``/``scale_steps`` (coarse-to-fine), ``avg_decay``,
``tile_size``/``tile_overlap``. The row ``default`` is instead what ``lightning-nst stylize CONTENT STYLE --size
SIZE --steps MAX_STEPS`` runs on the device, on the tutorial's objective: the module and data built from the config
that command builds (``configs/style_transfer_gram.yaml``: its L-BFGS settings, start and parameterisation, and
ImageOptimization's defaults for the rest) with the tutorial's layers and weights in place of its own objective, and
the precision ``lightning-nst`` chooses there (``auto_precision``: ``bf16-mixed`` where the device computes bfloat16
natively). Its clock reads the one definition's float32 score of its image after each step (every step up to 128
px, else every 5, the scoring time left off the clock, as for the peers), not its bf16 training loss.
A variant whose key this build's ``ImageOptimization`` does not accept prints "not available in this build" and no
number. The peers ``pystiche``
and ``pastiche`` run where installed (they are not dependencies: ``pip install --no-deps --target /some/dir
pystiche==1.0.1 pastiche==1.6.0`` and ``PYTHONPATH=/some/dir``), through ``benchmarks/peers.py``: the same
weights, layers, images and start, their own L-BFGS, with per-layer weights that make each peer's loss the common
one, scored every step (every 5 above 128 px).
On a CUDA device the reference and every variant run there; without one the script says so and runs on the CPU. The
``bf16`` variants run with ``precision: bf16-mixed`` where the device computes bfloat16 natively (CUDA with native
bf16, an x86 CPU with AVX512-BF16 or AMX: ``lightning_nst.core.hardware.fast_bf16``); elsewhere each says why it is
not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
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
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, optim
from torchvision.models.vgg import cfgs, make_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (benchmarks/peers.py)
from reference import (  # noqa: E402  (benchmarks/ is no package)
    CONTENT_WEIGHT,
    PARTIAL_WEIGHTS,
    STARRY_NIGHT,
    STYLE_WEIGHT,
    Score,
    get_style_model_and_losses,
    tutorial_objective,
)

from lightning_nst import ImageOptimization, ImageTargets, ImageWriter, VGGConfig  # noqa: E402
from lightning_nst.api import _module_and_data  # noqa: E402  (the API's own build of a shortcut's config)
from lightning_nst.cli.precision import choose_precision  # noqa: E402
from lightning_nst.cli.shortcuts import stylize_config, stylize_parser  # noqa: E402
from lightning_nst.core.hardware import bf16_reason, fast_bf16  # noqa: E402
from lightning_nst.core.images import load_image, save_image  # noqa: E402
from lightning_nst.core.vgg import VGG19Features  # noqa: E402


def lbfgs(params: Any) -> optim.Optimizer:
    """The optimizer of configs/style_transfer_gram.yaml."""
    return optim.LBFGS(params, lr=1.0, max_iter=1, history_size=50, line_search_fn=None)


def adam(params: Any) -> optim.Optimizer:
    """The product's default optimizer."""
    return optim.Adam(params, lr=0.02)


OPTIMIZERS = {"L-BFGS": lbfgs, "Adam": adam}


def variants(size: int, coarse_steps: int, total: int) -> dict[str, dict[str, Any]]:
    """Name -> ImageOptimization keyword arguments (the contract's keys) of every variant at output ``size``."""
    table: dict[str, dict[str, Any]] = {}
    for optimizer in OPTIMIZERS:
        for parameterization in ("pixels", "laplacian", "fourier"):
            base = {} if parameterization == "pixels" else {"parameterization": parameterization}
            table[f"{parameterization} {optimizer}"] = base
            two = [size // 2, size]
            three = [size // 4, size // 2, size]
            table[f"{parameterization} c2f-2 {optimizer}"] = {
                **base,
                "scales": two,
                "scale_steps": [coarse_steps, total - coarse_steps],
            }
            table[f"{parameterization} c2f-3 {optimizer}"] = {
                **base,
                "scales": three,
                "scale_steps": [coarse_steps, coarse_steps, total - 2 * coarse_steps],
            }
        table[f"pixels tiled {optimizer}"] = {"tile_size": max(size // 2, 128), "tile_overlap": 64}
        table[f"pixels bf16 {optimizer}"] = {"precision": "bf16-mixed"}  # a Trainer option; where bf16 is fast
        table[f"laplacian bf16 {optimizer}"] = {"parameterization": "laplacian", "precision": "bf16-mixed"}
    table[DEFAULT] = {}  # built from stylize's config instead (run_default)
    return table


DEFAULT = "default"
"""The row of what ``lightning-nst stylize`` runs (:func:`run_default`)."""

DEFAULT_VARIANTS = ["pixels L-BFGS", "pixels Adam", "laplacian L-BFGS", "fourier L-BFGS", "fourier Adam",
                    "pixels c2f-2 L-BFGS", "pixels c2f-3 L-BFGS", "pixels c2f-2 Adam", DEFAULT]  # fmt: skip


def missing_keys(kwargs: dict[str, Any]) -> list[str]:
    accepted = inspect.signature(ImageOptimization.__init__).parameters
    return [key for key in kwargs if key != "precision" and key not in accepted]


@dataclass
class Run:
    to_target: float | None  # seconds from building the model, None if not reached
    steps: str  # steps per size, e.g. "120@128 + 310@256"
    at_reference: Tensor | None  # the best full-size image seen within the reference's wall time
    seconds: float  # the whole run
    stages: dict[int, int] = field(default_factory=dict)


# -- the reference, on the chosen device ------------------------------------------------------------------------


def run_reference(args: argparse.Namespace, target: float, evaluations: int, budget: float | None = None) -> Run:
    """The tutorial's loop of benchmarks/reference.py on ``args.device``; also the best image within ``budget`` s."""
    started = time.perf_counter()
    device = torch.device(args.device)
    cnn = make_layers(cfgs["E"])
    if args.weights != "random":
        cnn.load_state_dict(torch.load(args.weights, weights_only=True), strict=False)
    else:
        cnn.load_state_dict(VGG19Features(["conv3_1"], weights="random").trunk.state_dict(), strict=False)
    cnn.eval().to(device)
    content = load_image(args.content, args.size).contiguous().to(device)
    style = load_image(args.style, args.size).contiguous().to(device)
    default = torch.get_default_device()
    torch.set_default_device(device)  # the tutorial's Normalization makes plain (non-buffer) tensors
    try:
        model, style_losses, content_losses = get_style_model_and_losses(cnn, style, content)
    finally:
        torch.set_default_device(default)
    image = content.clone().requires_grad_(True)
    model.requires_grad_(False)
    optimizer = optim.LBFGS([image])
    count, best = [0], [float("inf"), None]
    reached: list[float] = []
    args.losses = []

    def closure() -> Tensor:
        with torch.no_grad():
            image.clamp_(0, 1)
        optimizer.zero_grad()
        model(image)
        loss = STYLE_WEIGHT * sum(sl.loss for sl in style_losses) + CONTENT_WEIGHT * sum(
            cl.loss for cl in content_losses
        )
        loss.backward()
        count[0] += 1
        value = loss.item()
        args.losses.append(value)
        now = time.perf_counter() - started
        if budget is not None and now <= budget and value < best[0]:
            best[:] = [value, image.detach().clone()]
        if not reached and value <= target:
            reached.extend([now, count[0]])
        return loss

    while count[0] < evaluations and not (reached and (budget is None or time.perf_counter() - started > budget)):
        optimizer.step(closure)
    steps = reached[1] if reached else count[0]
    return Run(reached[0] if reached else None, f"{steps}@{args.size}", best[1], time.perf_counter() - started)


# -- ours --------------------------------------------------------------------------------------------------------


class Recorder(L.Callback):
    """Benchmark-only: time to the target at the output size, and the best image within the reference's time.

    The loss is the run's own training loss, or with ``score`` the one definition's score of the image after the
    step, every ``every`` steps, the scoring time left off the clock.
    """

    def __init__(self, target: float, budget: float, deadline: float, started: float, size: int,
                 score: Any = None, every: int = 1) -> None:  # fmt: skip
        self.target, self.budget, self.deadline, self.started, self.size = target, budget, deadline, started, size
        self.score, self.every, self.scoring = score, every, 0.0
        self.reached: float | None = None
        self.best = float("inf")
        self.image: Tensor | None = None
        self.stages: dict[int, int] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self._before = pl_module.image.detach().clone()  # the image this step's loss is measured on

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        side = max(self._before.shape[-2:])
        self.stages[side] = self.stages.get(side, 0) + 1
        loss, image = None, self._before
        if side == self.size and self.score is None:
            loss = sum(row["total"] for row in pl_module._current.values())
        elif side == self.size and trainer.global_step % self.every == 0:
            clock = time.perf_counter()
            image = pl_module.image.detach().cpu().float()
            loss = self.score(image)
            self.scoring += time.perf_counter() - clock
        now = time.perf_counter() - self.started - self.scoring
        if loss is not None:
            if now <= self.budget and loss < self.best:
                self.best, self.image = loss, image
            if self.reached is None and loss <= self.target:
                self.reached = now
                self.steps_to_target = sum(self.stages.values())
        if (self.reached is not None and now >= self.budget) or now > self.deadline:
            trainer.should_stop = True


def run_ours(args: argparse.Namespace, kwargs: dict[str, Any], optimizer: Any, target: float, budget: float,
             folder: Path, score: Score | None = None) -> Run:  # fmt: skip
    """A variant; with ``score``, one in bf16 is clocked by the float32 score of its image every 5 steps, as
    ``default`` is; without, by its own training loss."""
    started = time.perf_counter()
    kwargs = dict(kwargs)
    precision = kwargs.pop("precision", "32-true")
    objective = tutorial_objective()
    model = ImageOptimization(
        [objective], vgg=VGGConfig(weights=str(args.weights)), init="content", optimizer=optimizer, **kwargs
    )
    data = ImageTargets(content=args.content, style=[args.style], size=args.size)
    scored = {} if precision == "32-true" or score is None else {"score": score, "every": 1 if args.size <= 128 else 5}
    recorder = Recorder(target, budget, args.cap * budget, started, args.size, **scored)
    return fit_and_record(args, model, data, precision, recorder, folder)


def accelerator(args: argparse.Namespace) -> str:
    return "cuda" if args.device == "cuda" else "cpu"


def default_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config ``lightning-nst stylize`` builds for this size, steps and weights (parsed by its own parser)."""
    argv = [args.content, args.style, "-o", "default.png", "--size", str(args.size), "--steps", str(args.max_steps),
            "--weights", str(args.weights)]  # fmt: skip
    if str(args.weights) not in ("random", "imagenet", "auto"):
        argv.append("--fill-missing")  # a partial file: the deeper layers stylize uses get seeded random weights
    return stylize_config(stylize_parser().parse_args(argv))


def run_default(args: argparse.Namespace, target: float, budget: float, folder: Path, score: Score) -> Run:
    """What ``lightning-nst stylize`` runs on this device, on the tutorial's objective.

    Everything but the objective is stylize's: its module keys (optimizer, init, parameterization, L-BFGS options)
    and its data from its own parser, and the precision it chooses here. The objective is the tutorial's, because
    the row asks how fast stylize's settings reach the tutorial's loss; stylize's own objective (relu4_2 content,
    relu1_1..relu5_1 style) does not minimise that loss and never reaches its target.
    """
    started = time.perf_counter()
    config = default_config(args)
    L.seed_everything(config["seed_everything"], verbose=False)
    model_args = config["model"]["init_args"]
    model_args["objectives"] = [dataclasses.asdict(tutorial_objective())]
    model_args["vgg"] = {**(model_args.get("vgg") or {}), "weights": str(args.weights), "fill_missing": False}
    model, data = _module_and_data(config)
    precision = choose_precision(
        config["trainer"].get("precision"), accelerator(args), objectives=model.objectives
    ).precision
    every = 1 if args.size <= 128 else 5
    recorder = Recorder(target, budget, args.cap * budget, started, args.size, score=score, every=every)
    return fit_and_record(args, model, data, precision, recorder, folder)


def fit_and_record(args: argparse.Namespace, model: ImageOptimization, data: ImageTargets, precision: str,
                   recorder: Recorder, folder: Path) -> Run:  # fmt: skip
    """Fit ``model`` on ``data`` with a TensorBoard logger and an ImageWriter, as ``lightning-nst fit`` would."""
    work = Path(tempfile.mkdtemp(dir=folder))
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator=accelerator(args),
        devices=1,
        precision=precision,
        logger=TensorBoardLogger(work, name="bench", default_hp_metric=False),
        callbacks=[recorder, ImageWriter(output_dir=str(work / "out"), snapshot_every=50)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    stages = " + ".join(f"{n}@{side}" for side, n in sorted(recorder.stages.items()))
    reached = getattr(recorder, "steps_to_target", None)
    steps = f"{reached} (ran {stages})" if reached is not None else f"ran {stages}"
    return Run(recorder.reached, steps, recorder.image, time.perf_counter() - recorder.started)


# -- main ----------------------------------------------------------------------------------------------------------


def one_size(args: argparse.Namespace, names: list[str]) -> None:
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"\n== {args.size} px on {args.device}; 1-minute load average at start: {load}", flush=True)
    images = Path(tempfile.mkdtemp(prefix="nst-ttq-"))
    content = load_image(args.source_content, args.size)
    style = torch.nn.functional.interpolate(
        load_image(args.source_style), size=content.shape[-2:], mode="bilinear", antialias=True
    )
    args.content, args.style = str(save_image(content, images / "content.png")), str(images / "style.png")
    save_image(style, args.style)
    score = Score(args)  # on the CPU: one definition for every side's image

    calibration = run_reference(args, float("-inf"), args.reference_steps)
    target, initial = args.losses[args.reference_steps - 1], args.losses[0]
    check = score(load_image(args.content, args.size))
    if abs(check - initial) > 1e-4 * abs(initial):
        sys.exit(f"the two loss definitions disagree on the content image: {check} != {initial}")
    print(f"initial loss {initial:.4g}; target {target:.4g} (the reference after {args.reference_steps} evaluations,"
          f" {calibration.seconds:.1f} s)", flush=True)  # fmt: skip
    table = variants(args.size, args.coarse_steps, args.max_steps)
    runnable: list[str] = []
    for name in names:
        kwargs = table[name]
        missing = missing_keys(kwargs)
        if name == DEFAULT:
            config = default_config(args)
            choice = choose_precision(config["trainer"].get("precision"), accelerator(args))
            print(f"  {name}: lightning-nst stylize's config ({config['model']['init_args']['optimizer']['class_path']}"
                  f" {config['model']['init_args']['optimizer']['init_args']}), {choice.line()}")  # fmt: skip
            runnable.append(name)
        elif missing:
            print(f"  {name}: not available in this build (ImageOptimization has no {', '.join(missing)})")
        elif kwargs.get("precision") and not fast_bf16(accelerator(args)):
            print(f"  {name}: not run ({bf16_reason(accelerator(args), False)})")
        else:
            runnable.append(name)
    installed = {peer: version for peer, version in peers.available().items() if version and peer in args.peers}
    peer_rows = {peer: f"{peer} {version} (L-BFGS, common layer weights)" for peer, version in installed.items()}
    results: dict[str, list[Run]] = {"reference (tutorial)": [], **{name: [] for name in runnable}}
    results.update({row: [] for row in peer_rows.values()})
    with tempfile.TemporaryDirectory() as temporary:
        for _ in range(args.repeats):
            reference = run_reference(args, target, args.cap * args.reference_steps, budget=calibration.seconds)
            results["reference (tutorial)"].append(reference)
            budget = reference.to_target or calibration.seconds
            print(f"  reference: {reference.to_target} s", flush=True)
            for peer, row in peer_rows.items():
                run_peer = peers.run_pystiche if peer == "pystiche" else peers.run_pastiche
                run = run_peer(args, target, budget, score).as_run(Run)
                results[row].append(run)
                print(f"  {row}: {run.to_target} s, steps {run.steps}", flush=True)
            for name in runnable:
                if name == DEFAULT:
                    run = run_default(args, target, budget, Path(temporary), score)
                else:
                    optimizer = OPTIMIZERS[name.rsplit(" ", 1)[1]]
                    run = run_ours(args, table[name], optimizer, target, budget, Path(temporary), score)
                results[name].append(run)
                print(f"  {name}: {run.to_target} s, steps {run.steps}", flush=True)
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"1-minute load average at end: {load}")
    print(f"\nTime to the reference's loss after {args.reference_steps} evaluations ({target:.4g}; initial "
          f"{initial:.4g}), {args.size} px, {args.device}, {torch.get_num_threads()} threads, medians of "
          f"{args.repeats} round(s); loss at the reference's time scored by one definition")  # fmt: skip
    print(f"content {args.source_content}, style {args.source_style}, VGG weights {args.weights}")
    print("| variant | steps to target | s to target | × faster than reference | loss at reference's time |")
    print("|---|---|---|---|---|")
    base = statistics.median(r.to_target or float("nan") for r in results["reference (tutorial)"])
    for name, runs in results.items():
        reached = [r.to_target for r in runs if r.to_target is not None]
        if len(reached) == len(runs):
            seconds = statistics.median(reached)
            text, ratio = f"{seconds:.1f}", f"{base / seconds:.2f}"
        else:
            text, ratio = "not reached", "-"
        scored = [score(r.at_reference.cpu().float()) for r in runs if r.at_reference is not None]
        loss = f"{statistics.median(scored):.4g}" if scored else "-"
        print(f"| {name} | {runs[len(runs) // 2].steps} | {text} | {ratio} | {loss} |")


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_nst").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="names from VARIANTS; 'all' for all")
    parser.add_argument("--reference-steps", type=int, default=300)
    parser.add_argument("--coarse-steps", type=int, default=100, help="steps at each coarse scale")
    parser.add_argument("--max-steps", type=int, default=2000, help="trainer.max_steps of every fit")
    parser.add_argument("--cap", type=float, default=3.0, help="stop a run at this x the reference's time")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--content", default="skimage:astronaut")
    parser.add_argument("--style", default=str(STARRY_NIGHT) if STARRY_NIGHT else "skimage:gravel")
    parser.add_argument("--weights", default=str(PARTIAL_WEIGHTS) if PARTIAL_WEIGHTS else "random")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peers", nargs="*", default=list(peers.PEERS), help="installed peers to run (none: '')")
    args = parser.parse_args()
    if args.device != "cuda":
        print("No CUDA device (or --device cpu): CPU figures only.")
    bf16 = "run" if fast_bf16(accelerator(args)) else "not run"
    print(f"bf16 rows: {bf16} ({bf16_reason(accelerator(args), fast_bf16(accelerator(args)))})")
    names = list(variants(256, 1, 2)) if args.variants == ["all"] else args.variants
    unknown = [name for name in names if name not in variants(256, 1, 2)]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {list(variants(256, 1, 2))}")
    for peer, version in peers.available().items():
        run = "run" if version and peer in args.peers else "not run"
        print(f"peer {peer}: {f'{version} installed' if version else 'not installed'}; {run}")
    args.layer_weights = "common"  # the peers optimise exactly the common loss (benchmarks/peers.py)
    args.source_content, args.source_style = args.content, args.style
    for size in args.sizes:
        args.size = size
        one_size(args, names)


if __name__ == "__main__":
    main()
