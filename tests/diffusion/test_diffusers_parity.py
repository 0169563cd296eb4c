"""A run at guidance ``scale: 0`` saves, bit for bit, the images diffusers' own pipeline gives for the same settings.

Through the user's code path (the CLI with the family's shipped config) against ``DiffusionPipeline.__call__`` with
``output_type="pil"``: the same prompt, negative prompt, seed, steps, size, sampler and CFG scale, read back from the
manifest. It holds the loop (``GuidedDiffusion.predict_step`` and :mod:`~lightning_nst.diffusion.families`) to the
pipelines'
own ``__call__``, and the saved PNG to diffusers' 8-bit rounding (``numpy_to_pil``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from lightning_nst.main import main
from tests.conftest import CONFIGS
from tests.tiny_pipeline import records, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_scale_zero_saves_the_diffusers_pipelines_own_images(
    family: str, pipeline_dir: Path, sdxl_dir: Path, sd3_dir: Path, flux_dir: Path, tmp_path: Path
) -> None:
    folder = {"sd": pipeline_dir, "sdxl": sdxl_dir, "sd3": sd3_dir, "flux": flux_dir}[family]
    config = CONFIGS / ("guided_diffusion.yaml" if family == "sd" else f"guided_{family}.yaml")
    out = tmp_path / "out"
    main(
        tiny_args(
            folder,
            "parity",
            "--trainer.precision=32-true",  # the SD3 and Flux configs' bf16-true, as on a CPU
            "--model.guidance.init_args.scale=0",
            "--data.seeds=[0, 1]",
            f"--trainer.callbacks.init_args.output_dir={out}",
            config=config,
            steps=4,
        )
    )
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    # Frozen, as GuidedDiffusion holds them: with weights that require grad, torch's linear takes another kernel for
    # the permuted 3-D input of SDXL's linear attention projections (proj_in), which rounds differently (7e-7).
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    for record in records(out):
        # The shipped configs' samplers are the tiny pipelines' own schedulers (DDIM, Euler, FlowMatchEuler).
        assert record["scheduler"] == type(pipe.scheduler).__name__ and record["guided"] == [False] * 4
        height, width = record["size"]
        # FluxPipeline takes no negative prompt without true_cfg_scale, as the loop uses none.
        negative = {} if family == "flux" else {"negative_prompt": record["negative_prompt"]}
        (expected,) = pipe(
            record["prompt"],
            **negative,
            num_inference_steps=record["num_inference_steps"],
            guidance_scale=record["cfg_scale"],
            height=height,
            width=width,
            generator=torch.Generator("cpu").manual_seed(record["seed"]),
            output_type="pil",
        ).images
        with Image.open(out / record["image"]) as saved:
            assert np.array_equal(np.asarray(saved), np.asarray(expected)), record["seed"]
