"""What the experiments share to make their runs and state their claims: run configs, images read back, verdicts.

Every run is a shipped ``configs/*.yaml`` with the report's settings (:func:`fit_config`, :func:`generation_config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image

from lightning_nst.core.losses import Statistic
from lightning_nst.outputs import GenerationRecord
from lightning_nst.report.configs import run_config
from lightning_nst.report.folder import Report
from lightning_nst.report.settings import ReportSettings


def open_rgb(path: Path) -> Image.Image:
    """The image file at ``path`` as an RGB image, read at once (the file is closed)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def verdict(holds: bool) -> str:
    """A claim's verdict in bold: ``holds`` or ``does not hold``."""
    return "**holds**" if holds else "**does not hold**"


def count_verdict(held: Sequence[bool]) -> str:
    """``holds on k of n cases``, and a verdict on the claim only when it held on every case."""
    k, n = sum(held), len(held)
    verdict = "**holds**" if k == n else "**does not hold**" if k == 0 else "**not shown**"
    return f"holds on **{k} of {n}** cases → {verdict}"


def fit_config(
    report: Report,
    run: str,
    shipped: str,
    objectives: list[dict[str, Any]],
    data: dict[str, Any],
    init: str = "noise",
    save_every: int = 0,
    seed: int | None = None,
) -> dict[str, Any]:
    """The shipped ``configs/<shipped>.yaml`` with the report's objectives, images and settings; its optimizer stays."""
    s = report.settings
    model = {
        "objectives": objectives,
        "vgg": asdict(s.vgg),
        "init": init,
        "init_seed": s.seed if seed is None else seed,
    }
    writer = {"class_path": "lightning_nst.ImageWriter", "init_args": {"snapshot_every": 0, "save_every": save_every}}
    return run_config(
        shipped,
        report.trainer(run, max_steps=s.steps, enable_checkpointing=False, callbacks=[writer]),
        model={"init_args": model},
        data={"init_args": {**data, "size": s.size}},
    )


def style_objective(name: str, layers: list[str], statistic: Statistic, settings: ReportSettings) -> dict[str, Any]:
    """A style objective over ``layers`` on ``statistic``, weighted as the settings weigh that statistic."""
    weight = settings.gram_weight if statistic == "gram" else settings.meanvar_weight
    return {"name": name, "style_layers": layers, "style_weight": weight, "statistic": statistic}


def generation_config(
    report: Report,
    run: str,
    scale: float,
    style_prompt: str | None = None,
    preview_every: int = 0,
    preview_steps: list[int] | None = None,
    prompt: str | None = None,
    init_image: str | None = None,
    strength: float = 1.0,
) -> dict[str, Any]:
    """A shipped generation config with the report's settings.

    ``configs/guided_diffusion.yaml``; ``prompt_only_diffusion.yaml`` with a ``style_prompt``; ``guided_img2img.yaml``
    with an ``init_image``. The report sets the prompt (``settings.prompt`` unless given), images, sizes, guidance
    scale and img2img strength; the sampler, the guidance schedule and the batch size stay the shipped config's.
    """
    s = report.settings
    logger = {
        "class_path": "lightning_nst.TrajectoryLogger",
        "init_args": {
            "preview_every": preview_every,
            "preview_steps": preview_steps,
            "save_dir": str(report.run_dir(run) / "x0"),
        },
    }
    writer = {"class_path": "lightning_nst.GenerationWriter", "init_args": {"output_dir": None}}
    # Gram, whatever the shipped config says: the report's tables compare Gram style losses.
    guidance = {"scale": scale, "guidance_size": s.guidance_size, "layers": s.style_layers, "statistic": "gram"}
    guidance["vgg"] = asdict(s.vgg)
    model = {
        "model": s.model,
        "tiny_vae": s.tiny_vae,
        "num_inference_steps": s.sampling_steps,
        "cfg_scale": s.cfg_scale,
        "height": s.image_size,
        "width": s.image_size,
        "guidance": {"init_args": guidance},
    }
    data: dict[str, Any] = {
        "prompts": [prompt or s.prompt],
        "seeds": [s.seed],
        "style": [s.style],
        "negative_prompt": s.negative_prompt,
    }
    if style_prompt:
        data["style_prompts"] = [style_prompt]
    if init_image is not None:
        model["strength"] = strength
        data["init_images"] = [init_image]
    name = "prompt_only_diffusion" if style_prompt else "guided_diffusion"
    return run_config(
        "guided_img2img" if init_image is not None else name,
        report.trainer(run, callbacks=[logger, writer]),
        model={"init_args": model},
        data={"init_args": data},
    )


def generate(report: Report, run: str, **kwargs: Any) -> GenerationRecord:
    """Run one generation (:func:`generation_config` with ``kwargs``) and return its one record."""
    (record,) = report.predict(run, generation_config(report, run, **kwargs))
    return record
