"""``guided_img2img_vs_nst``: guided img2img of the content photo at each strength against unguided img2img and NST."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from lightning_nst.core.images import load_image, read_image, to_pil
from lightning_nst.core.vgg import check_layers
from lightning_nst.outputs import result_file
from lightning_nst.report.experiments.common import (
    count_verdict,
    fit_config,
    generate,
    open_rgb,
    style_objective,
    verdict,
)
from lightning_nst.report.experiments.measures import StyleMeter
from lightning_nst.report.figures import image_table
from lightning_nst.report.folder import Report
from lightning_nst.report.settings import ReportSettings


class ContentMeter:
    """PSNR and SSIM (torchmetrics) of image files against the content image, all at one size.

    The content image is resized to ``size`` on its long edge and every image measured to exactly its height and
    width, so outputs whose sides were rounded (img2img's multiples of 8) are compared pixel for pixel.
    """

    def __init__(self, content: str, size: int) -> None:
        self.target = load_image(content, size, key="content")

    @torch.no_grad()
    def __call__(self, path: str | Path) -> tuple[float, float]:
        """``(PSNR in dB, SSIM)`` of the image file at ``path``."""
        # Decoded as the target was (a JPEG several times larger at reduced scale), so the photo is itself exactly.
        image = read_image(path, key=str(path), max_side=max(self.target.shape[-2:]))
        image = TF.resize(image, list(self.target.shape[-2:]), antialias=True).clamp(0, 1)
        psnr = peak_signal_noise_ratio(image, self.target, data_range=1.0).item()
        ssim = structural_similarity_index_measure(image, self.target, data_range=1.0).item()
        return psnr, float(ssim)


def _img2img_run(strength: float, guided: bool) -> str:
    return f"{'guided' if guided else 'unguided'}_{strength:g}"


def guided_img2img_vs_nst(settings: ReportSettings) -> Path:
    """Guided img2img of the content photo at each strength against its unguided img2img and Gatys NST (Gram)."""
    layers = check_layers(settings.style_layers, "style_layers")
    content = check_layers([settings.content_layer], "content_layer")
    strengths = sorted(settings.strengths)
    title = "Guided img2img against neural style transfer"
    report = Report("guided_img2img_vs_nst", title, settings, layers + content, runs=1 + 2 * len(strengths))
    objective = {**style_objective("gram", layers, "gram", settings), "content_layers": content}
    report.fit(
        "nst_gram",
        fit_config(
            report,
            "nst_gram",
            "style_transfer_gram",
            [objective],
            {"content": settings.content, "style": [settings.style]},
            init="content",
        ),
    )
    images: dict[tuple[float, bool], str] = {}  # (strength, guided) -> image file
    for strength in strengths:
        for guided in (False, True):
            run = _img2img_run(strength, guided)
            record = generate(
                report,
                run,
                scale=settings.guidance_scale if guided else 0.0,
                prompt=settings.content_prompt,
                init_image=settings.content,
                strength=strength,
            )
            images[strength, guided] = str(report.run_dir(run) / record.image)
    style = StyleMeter(report, settings.style, layers, "gram", settings.guidance_size)
    photo = ContentMeter(settings.content, settings.guidance_size)
    nst = str(report.run_dir("nst_gram") / result_file("gram"))
    # (Gram style loss, PSNR, SSIM) by file, the photo by its source
    measured = {path: (style(path), *photo(path)) for path in [settings.content, nst, *images.values()]}
    rows = [["content photo", "", "", *measured[settings.content]], ["NST Gram", "", "", *measured[nst]]]
    for (strength, guided), path in images.items():
        rows.append(["guided img2img" if guided else "img2img", strength, settings.guidance_scale * guided,
                     *measured[path]])  # fmt: skip
    report.table(
        f"The content photo ({settings.content}) styled after {settings.style}: NST ({settings.steps} L-BFGS steps "
        f"from the photo, {settings.size} px) and img2img of '{settings.content_prompt}' (seed {settings.seed}, "
        f"the last int({settings.sampling_steps} × strength) of {settings.sampling_steps} sampling steps), unguided "
        f"(scale 0) and guided, at each strength. Style loss: Gram over {', '.join(layers)} at "
        f"{settings.guidance_size} px, one definition for every row; PSNR and SSIM against the photo at its size "
        f"at {settings.guidance_size} px (the photo's own row is the reference: PSNR infinite, shown '–').",
        ["image", "strength", "guidance scale", "Gram style loss", "PSNR dB", "SSIM"],
        rows,
    )
    pairs = [(strength, measured[images[strength, False]], measured[images[strength, True]]) for strength in strengths]
    report.table(
        "Guided against unguided img2img at each strength, same seed: the ratio of their style losses and the change "
        "of PSNR and SSIM that guidance costs.",
        ["strength", "style loss guided / unguided", "Δ PSNR dB", "Δ SSIM"],
        [[strength, g[0] / u[0] if u[0] else math.nan, g[1] - u[1], g[2] - u[2]] for strength, u, g in pairs],
    )
    cells: list[list[Image.Image | None]] = []
    notes: list[list[str]] = []
    style_image = to_pil(load_image(settings.style, settings.guidance_size, key="style"))

    def note(path: str) -> str:
        return f"L={measured[path][0]:.3g} SSIM={measured[path][2]:.2f}"

    for index, strength in enumerate(strengths):
        first = index == 0
        paths = [nst if first else None, images[strength, False], images[strength, True]]
        row = [style_image, to_pil(photo.target)] if first else [None, None]
        cells.append([*row, *(open_rgb(Path(path)) if path else None for path in paths)])
        notes.append(["", note(settings.content) if first else "", *(note(path) if path else "" for path in paths)])
    report.figure(
        "guided_img2img_vs_nst.png",
        image_table(
            cells,
            ["style", "content photo", "NST Gram", "img2img", "guided img2img"],
            [f"strength {strength:g}" for strength in strengths],
            notes,
        ),
        f"'{settings.content_prompt}' from the content photo (seed {settings.seed}): img2img unguided and guided "
        f"(scale {settings.guidance_scale}) at each strength, against NST Gram ({settings.steps} steps)",
        [
            f"L: Gram style loss over {', '.join(layers)} at {settings.guidance_size} px against {settings.style}; "
            f"SSIM against the photo at {settings.guidance_size} px",
            f"Stable Diffusion pipeline: {settings.model}",
        ],
    )
    lower = [g[0] < u[0] for _, u, g in pairs]
    nst_style = [measured[nst][0] < g[0] for _, _, g in pairs]
    nst_ssim = [measured[nst][2] > g[2] for _, _, g in pairs]
    lines = [
        "## The study's claims on these weights",
        f"Stable Diffusion pipeline: {settings.model}. Each claim is counted over the {len(strengths)} strength(s) "
        f"{strengths}; it is said to hold only when it holds at all of them, and 'not shown' when at some.",
        "",
        "- Guided img2img lowers the style loss against unguided img2img at each strength (ratios "
        f"{', '.join(f'{g[0] / u[0]:.3g}' for _, u, g in pairs)}): {count_verdict(lower)}.",
        f"- NST (Gram) reaches a lower style loss than guided img2img at each strength: {count_verdict(nst_style)}.",
        f"- NST keeps more of the photo (higher SSIM, {measured[nst][2]:.3g}) than guided img2img at each strength: "
        f"{count_verdict(nst_ssim)}.",
    ]
    if len(strengths) > 1:
        ssim = [u[2] for _, u, _ in pairs]
        falls = all(a > b for a, b in zip(ssim, ssim[1:], strict=False))
        lines.append(
            "- A higher strength keeps less of the photo: unguided img2img's SSIM "
            f"{' → '.join(f'{value:.3g}' for value in ssim)} from strength {strengths[0]:g} to {strengths[-1]:g} → "
            f"{verdict(falls)} (criterion: it falls at each higher strength)."
        )
    report.text(*lines)
    return report.write()
