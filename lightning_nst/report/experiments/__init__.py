"""The study's experiments, each a report: runs through the CLI, then figures, tables and claims.

One module per experiment, named after it; :mod:`.common` builds the runs' configs and words the verdicts, and
:mod:`.measures` holds the measurements several experiments take.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lightning_nst.core.errors import NSTError
from lightning_nst.core.images import check_source
from lightning_nst.report.configs import shipped
from lightning_nst.report.experiments import (
    fast_vs_optimisation,
    gram_vs_meanvar,
    guided_img2img_vs_nst,
    guided_vs_nst,
    guided_vs_prompt,
    reconstruction,
    style_controls,
    texture_layers,
)
from lightning_nst.report.folder import report_folder, undone_if_refused, weights_stated_once
from lightning_nst.report.settings import ReportSettings

EXPERIMENTS: dict[str, Callable[[ReportSettings], Path]] = {
    "reconstruction": reconstruction.reconstruction,
    "texture_layers": texture_layers.texture_layers,
    "gram_vs_meanvar": gram_vs_meanvar.gram_vs_meanvar,
    "guided_vs_nst": guided_vs_nst.guided_vs_nst,
    "guided_vs_prompt": guided_vs_prompt.guided_vs_prompt,
    "guided_img2img_vs_nst": guided_img2img_vs_nst.guided_img2img_vs_nst,
    "style_controls": style_controls.style_controls,
    "fast_vs_optimisation": fast_vs_optimisation.fast_vs_optimisation,
}
"""The study's experiments by name, in the study's order."""

SHIPPED = {
    "reconstruction": ["content_reconstruction"],
    "texture_layers": ["texture_gram"],
    "gram_vs_meanvar": ["texture_gram", "texture_meanvar"],
    "guided_vs_nst": ["guided_diffusion", "style_transfer_gram", "style_transfer_meanvar"],
    "guided_vs_prompt": ["guided_diffusion", "prompt_only_diffusion"],
    "guided_img2img_vs_nst": ["guided_img2img", "style_transfer_gram"],
    "style_controls": ["style_transfer_luminance", "style_blend", "style_masks", "texture_gram"],
    "fast_vs_optimisation": ["fast_style_train", "style_transfer_gram"],
}
"""The shipped configs each experiment's runs are built from."""


IMAGES = {
    "reconstruction": ["content"],
    "texture_layers": ["texture"],
    "gram_vs_meanvar": ["textures"],
    "guided_vs_nst": ["style"],
    "guided_vs_prompt": ["style"],
    "guided_img2img_vs_nst": ["content", "style"],
    "style_controls": ["content", "style", "second_style", "texture", "masks"],
    "fast_vs_optimisation": ["style", "held_out"],
}
"""The image settings each experiment reads: checked (each file exists, each sample is known) before anything else."""


def check_images(experiment: str, settings: ReportSettings) -> None:
    """Raise naming the first image setting of ``experiment`` that is neither a file nor a known sample."""
    for key in IMAGES.get(experiment, []):
        value = getattr(settings, key)
        for index, source in enumerate(value) if isinstance(value, list) else [(None, value)]:
            check_source(source, key if index is None else f"{key}[{index}]")


def run(experiment: str, settings: ReportSettings) -> Path:
    """Make the report of ``experiment`` and return its ``report.md``.

    A report refused for bad input leaves a folder that was new or empty as it was (:func:`undone_if_refused`).
    """
    if experiment not in EXPERIMENTS:
        raise NSTError(f"experiment: {experiment!r} is not one of {', '.join(EXPERIMENTS)}")
    settings.check()
    for name in SHIPPED.get(experiment, []):
        shipped(name)  # before any run: a missing one is named at once
    check_images(experiment, settings)
    with weights_stated_once(), undone_if_refused(report_folder(experiment, settings)):
        return EXPERIMENTS[experiment](settings)
