"""``fast_vs_optimisation``: a trained fast style network against ``stylize``'s optimisation on held-out photos.

A Johnson network (``configs/fast_style_train.yaml``) is trained on the training photos in the style image, then
it and Gatys optimisation (``configs/style_transfer_gram.yaml``, the report's ``steps``) stylize each held-out
photo. Both results are scored on one definition (the Gram style loss over the report's style layers against the
style image, the content loss at its content layer against the photo), beside the time each took for the photo.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from lightning_nst.core.images import SAMPLES_DIR, load_image, png_bytes, to_pil
from lightning_nst.core.losses import ContentLoss
from lightning_nst.core.vgg import check_layers
from lightning_nst.nst.fast.data import SHIPPED_FOLDER
from lightning_nst.nst.fast.inference import Stylizer, load_network
from lightning_nst.outputs import result_file
from lightning_nst.report.configs import run_config
from lightning_nst.report.experiments.common import fit_config, open_rgb, style_objective
from lightning_nst.report.experiments.measures import StyleMeter
from lightning_nst.report.figures import image_table
from lightning_nst.report.folder import Report
from lightning_nst.report.settings import ReportSettings


def _stem(source: str) -> str:
    return Path(source.split(":", 1)[-1]).stem


def _training_photos(report: Report, settings: ReportSettings) -> str:
    """The training folder: ``train_photos``, or a copy of the shipped samples without the held-out photos."""
    if settings.train_photos != SHIPPED_FOLDER:
        return settings.train_photos
    held = {_stem(photo) for photo in settings.held_out}
    folder = report.folder / "train_photos"
    for sample in sorted(SAMPLES_DIR.glob("*.jpg")):
        if sample.stem not in held and not sample.stem.startswith("mask"):
            report.write_file(f"train_photos/{sample.name}", sample.read_bytes())
    return str(folder)


def fast_vs_optimisation(settings: ReportSettings) -> Path:
    """A trained Johnson network against Gatys optimisation on held-out photos: images, losses and time."""
    layers = check_layers(settings.style_layers, "style_layers")
    content_layer = check_layers([settings.content_layer], "content_layer")[0]
    title = "A fast style network against optimisation"
    report = Report("fast_vs_optimisation", title, settings, [*layers, content_layer], runs=1 + len(settings.held_out))
    train = run_config(
        "fast_style_train",
        report.trainer(
            "network",
            max_steps=settings.train_steps,
            max_epochs=-1,  # the shipped config's: max_steps ends the training, whatever the epochs
            callbacks=[
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_top_k": 0, "save_last": True},
                }
            ],
        ),  # fmt: skip
        model={"init_args": {"vgg": asdict(settings.vgg), "style_size": settings.size}},
        data={
            "init_args": {
                "images": _training_photos(report, settings),
                "style": settings.style,
                "size": settings.train_size,
                "num_workers": 0,
            }
        },  # fmt: skip
    )
    started, wall = time.monotonic(), time.time()
    checkpoint = report.train("network", train)
    train_seconds = time.monotonic() - started
    network = load_network(checkpoint, key="network")
    # A training read back from an earlier invocation of the report took no time now: say so instead of a time.
    training = f"took {train_seconds:.0f} s" if checkpoint.stat().st_mtime >= wall else "ran in an earlier invocation"
    device = "cpu" if settings.accelerator == "cpu" else "auto"
    stylizer = Stylizer(network, device=device, precision="bf16" if settings.precision.startswith("bf16") else "32")
    meter = StyleMeter(report, settings.style, layers, "gram", settings.size)
    rows, cells, notes, labels = [], [], [], []
    for index, photo in enumerate(settings.held_out):
        content = load_image(photo, settings.size, key=f"held_out[{index}]")
        clock = time.perf_counter()
        with torch.no_grad():
            fast = stylizer(content)
        fast_seconds = time.perf_counter() - clock
        fast_path = report.write_file(f"network/{index}-{_stem(photo)}.png", png_bytes(fast))
        objective = {**style_objective("gram", layers, "gram", settings), "content_layers": [content_layer]}
        run = f"optimisation_{index}"
        images = {"content": photo, "style": [settings.style]}
        summary = report.fit(run, fit_config(report, run, "style_transfer_gram", [objective], images, init="content"))
        optimised = report.run_dir(run) / result_file("gram")
        with torch.no_grad():
            target = ContentLoss(report.features(content)[content_layer])
            scores = {
                name: (meter(path), float(target(report.features(load_image(path, settings.size))[content_layer])))
                for name, path in (("photo itself", photo), ("network", fast_path), ("optimisation", optimised))
            }
        opt_seconds = summary.wall_time_s
        rows += [
            [photo, "photo itself", *scores["photo itself"], "-"],
            [photo, "network", *scores["network"], f"{fast_seconds:.3g}"],
            [photo, f"optimisation ({settings.steps} steps)", *scores["optimisation"], f"{opt_seconds:.3g}"],
        ]
        cells.append([to_pil(content), open_rgb(fast_path), open_rgb(optimised)])
        notes.append([f"L={scores[name][0]:.3g}" for name in ("photo itself", "network", "optimisation")])
        labels.append(photo)
    report.figure(
        "fast_vs_optimisation.png",
        image_table(cells, ["held-out photo", "network", "optimisation"], labels, notes),
        f"Held-out photos in the style of {settings.style}: the network ({settings.train_steps} training steps on "
        f"{settings.train_size} px crops) against {settings.steps} steps of optimisation",
        [f"L: Gram style loss over {', '.join(layers)} at {settings.size} px against {settings.style}"],
    )
    report.table(
        f"One definition for every cell: Gram style loss over {', '.join(layers)} against the style image, content "
        f"loss at {content_layer} against the photo, at {settings.size} px; seconds of stylizing each photo (the "
        f"network's forward pass; the optimisation's fit). The network's training {training}, once for every photo.",
        ["photo", "method", "style loss", "content loss", "seconds"],
        rows,
    )
    return report.write()
