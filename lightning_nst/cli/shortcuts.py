"""``lightning-nst stylize|texture|generate``: flat flags for everyday runs, on the same path as ``fit``/``predict``.

Each shortcut is a shipped config with the flags as overrides (:func:`stylize_config`, :func:`texture_config`,
:func:`generate_config`), run through :func:`lightning_nst.cli.lightning.run` as ``fit -c <that config>`` or
``predict -c <that config>`` would run it; ``--print-config`` prints that config as YAML instead. ``stylize`` and
``texture`` then copy the result the run's ImageWriter wrote into its folder to the file named by ``-o``.

``stylize --network CKPT`` runs a trained fast style network instead (:mod:`lightning_nst.nst.fast.inference`): one
forward pass per image, a folder in and a folder out, or a video's frames; ``export`` writes such a network as
TorchScript.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from lightning_nst.cli import shipped
from lightning_nst.core.choices import COLOR_MODES, PARAMETERIZATIONS, STATISTICS
from lightning_nst.core.errors import NSTError
from lightning_nst.core.layers import DEFAULT_STYLE_LAYERS, LAYER_NAMES, min_input_size
from lightning_nst.core.seeds import MAX_SEED, check_seed
from lightning_nst.diffusion.catalog import FAMILY_CONFIGS, SCHEDULERS, local_family

MAX_ITEM_SEED = 2**63 - 1
"""The largest seed of a generated item (``data.seeds``)."""

ADAM = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.02}}
"""``--optimizer adam``: the learning rate of :func:`lightning_nst.nst.optimizers.default_optimizer`."""

OPTIMIZERS = ("lbfgs", "adam")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are :class:`NSTError`, so ``lightning-nst`` prints them as one line."""

    def error(self, message: str) -> NoReturn:
        raise NSTError(f"{self.prog.removeprefix('lightning-nst ')}: {message} (see `{self.prog} --help`)")


def _common(parser: argparse.ArgumentParser, size_default: str, init_default: str) -> None:
    """The flags ``stylize`` and ``texture`` share."""
    parser.add_argument("-o", "--output", required=True, help="the result image (.png; .jpg and others by suffix)")
    parser.add_argument("--size", type=int, help=f"long edge of the result in pixels (default: {size_default})")
    parser.add_argument("--steps", type=int, help="optimisation steps (default: the config's, 500)")
    parser.add_argument("--style-weight", type=float, help="weight of the style term (default: the config's)")
    parser.add_argument("--statistic", choices=STATISTICS, default="gram", help="style statistic (gram)")
    parser.add_argument(
        "--style-weights", type=float, nargs="+", help="blend weight of each style image (default: equal)"
    )
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="lbfgs", help="optimizer (lbfgs)")
    parser.add_argument(
        "--parameterization",
        choices=PARAMETERIZATIONS,
        help="what the optimizer moves: the pixels, a Laplacian pyramid or a Fourier spectrum (default: the "
        "config's, pixels)",
    )
    parser.add_argument("--init", default=init_default, help=f"noise, content or an image path ({init_default})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run and of a noise start (0)")
    parser.add_argument("--weights", default="auto", help="VGG19 weights: auto, imagenet, random or a file (auto)")
    _fill_missing(parser)
    parser.add_argument(
        "--logs", default="logs", help="TensorBoard folder; the run goes to <logs>/<-o's stem>/version_N"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    parser.add_argument(
        "--keep-partial",
        action="store_true",
        help="when Ctrl-C or SIGTERM stops the run, write the best image so far to -o (--resume replaces it)",
    )
    parser.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="finish a stopped run from its checkpoint (the command a stop prints), with the same flags",
    )
    parser.add_argument("--print-config", action="store_true", help="print the equivalent `fit -c` YAML and stop")


def _fill_missing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fill-missing",
        action="store_true",
        help="with a weights file that covers fewer layers than the run uses (a partial VGG19), give the deeper "
        "layers seeded random weights (said in the run's weights line) instead of refusing",
    )


def stylize_parser() -> argparse.ArgumentParser:
    """The parser of ``lightning-nst stylize``."""
    parser = _Parser(
        prog="lightning-nst stylize",
        description="Gatys style transfer of CONTENT in the style of STYLE (several are blended): "
        "configs/style_transfer_<statistic>.yaml with these flags as overrides, run as `lightning-nst fit`. With "
        "--network CKPT, one forward pass of a trained fast style network instead (see its flags below).",
    )
    parser.add_argument("content", help="the content image; with --network also a folder of images or a video file")
    parser.add_argument("style", nargs="*", help="the style image(s); none for a Johnson network (--network)")
    _common(parser, "512", "content")
    parser.add_argument("--content-weight", type=float, help="weight of the content term (default: 1)")
    parser.add_argument(
        "--color",
        choices=COLOR_MODES,
        default="keep",
        help="keep (the style's colours), luminance (transfer luminance only, keep the content's colours), match "
        "(the style's colours matched to the content's first) or histogram (the result's histograms matched to the "
        "content's) (keep)",
    )
    network = parser.add_argument_group(
        "a trained fast style network (--network; the optimisation's flags do not apply)",
        "CONTENT may be an image (-o a file), a folder (-o a folder: the same relative paths, each file written once, "
        "a rerun finishes what is missing) or a video file (-o a video at the same frame rate). A Johnson network "
        "takes no STYLE; an AdaIN network takes one or several (mixed by --style-weights).",
    )
    network.add_argument("--network", metavar="CKPT", help="stylize with this trained network's checkpoint")
    network.add_argument("--alpha", type=float, help="AdaIN: content (0) to style (1) trade-off (1)")
    network.add_argument(
        "--preserve-color",
        action="store_true",
        help="keep the content's colours: AdaIN matches the style's colours to the content's first (the AdaIN "
        "paper's colour control); a Johnson network's result keeps its luminance and takes the content's chroma",
    )
    network.add_argument("--style-size", type=int, help="AdaIN: long edge of the style images in pixels (512)")
    network.add_argument("--suffix", default=".png", help="a folder's result files' type (.png)")
    network.add_argument("--batch-size", type=int, default=1, help="a folder's images per forward pass (1)")
    network.add_argument("--device", default="auto", help="auto (CUDA where available, else cpu), cpu, cuda (auto)")
    network.add_argument(
        "--precision",
        choices=("auto", "32", "bf16"),
        default="auto",
        help="auto: bf16 autocast where the device computes bfloat16 natively, else float32 (auto)",
    )
    return parser


NETWORK_ONLY = ("alpha", "preserve_color", "style_size", "suffix", "batch_size", "device", "precision")
"""The ``stylize`` flags (their ``dest``) that apply only with ``--network``."""
SHARED = ("content", "style", "output", "size", "style_weights", "overwrite", "network")
"""The ``stylize`` flags of both the optimisation and ``--network``; the others are the optimisation's alone."""


def texture_parser() -> argparse.ArgumentParser:
    """The parser of ``lightning-nst texture``."""
    parser = _Parser(
        prog="lightning-nst texture",
        description="Texture synthesis from TEXTURE (several are blended): configs/texture_<statistic>.yaml with "
        "these flags as overrides, run as `lightning-nst fit`.",
    )
    parser.add_argument("texture", nargs="+", help="the texture image(s)")
    _common(parser, "256", "noise")
    return parser


def generate_parser() -> argparse.ArgumentParser:
    """The parser of ``lightning-nst generate``."""
    parser = _Parser(
        prog="lightning-nst generate",
        description="Style-guided diffusion: the model family's shipped config (configs/guided_diffusion.yaml for SD "
        "1.x/2.x, guided_sdxl, guided_sd3, guided_flux) with these flags as overrides, run as `lightning-nst "
        "predict`; one image per prompt and seed in OUTDIR.",
    )
    parser.add_argument("prompt", nargs="+", help="the prompt(s)")
    parser.add_argument("--style", nargs="+", required=True, help="the style image(s); each gives its own images")
    parser.add_argument("-o", "--output", required=True, help="the output folder (a rerun finishes what is missing)")
    parser.add_argument(
        "--model",
        help="a diffusers pipeline of SD 1.x/2.x, SDXL, SD3 or Flux: hub id or local folder (default: SD 1.5)",
    )
    parser.add_argument(
        "--family",
        choices=list(FAMILY_CONFIGS),
        help="the model's family, which picks the config; default: read from the model's model_index.json",
    )
    parser.add_argument("--steps", type=int, help="sampling steps (default: the config's, 50 for SD 1.5)")
    parser.add_argument("--scale", type=float, help="style guidance scale, 0 for none (default: the config's, 0.2)")
    parser.add_argument(
        "--sampler",
        help=f"the sampler: {', '.join(SCHEDULERS)}, pipeline or a diffusers scheduler class name (default: the "
        "config's: ddim for SD 1.5, euler for SDXL, flow_euler for SD3 and Flux)",
    )
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="the seed (default: 0)")
    seeds.add_argument("--seeds", type=int, nargs="+", help="several seeds, one image each")
    parser.add_argument(
        "--cfg-scale",
        type=float,
        help="classifier-free guidance scale; Flux-dev's distilled guidance (default: the config's)",
    )
    parser.add_argument(
        "--size", type=int, help="image height and width in pixels (default: the family's native size, 512 for SD 1.5)"
    )
    parser.add_argument(
        "--init-image",
        help="img2img: start from this image (configs/guided_img2img.yaml); the output keeps its aspect ratio, "
        "with --size as the long edge",
    )
    parser.add_argument("--strength", type=float, help="img2img strength in (0, 1]; 1 is text-to-image (default: 0.6)")
    parser.add_argument("--weights", default="auto", help="VGG19 weights: auto, imagenet, random or a file (auto)")
    _fill_missing(parser)
    parser.add_argument(
        "--logs", default="logs", help="TensorBoard folder; the run goes to <logs>/<-o's name>/version_N"
    )
    parser.add_argument("--overwrite", action="store_true", help="generate every item again, replacing the folder's")
    parser.add_argument("--print-config", action="store_true", help="print the equivalent `predict -c` YAML and stop")
    return parser


def _shipped(name: str) -> dict[str, Any]:
    return yaml.safe_load(shipped.path(name).read_text(encoding="utf-8"))


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise NSTError(f"{flag}: must be an integer > 0 (got {value})")
    if value is not None and value > sys.maxsize:
        raise NSTError(f"{flag}: must be at most {sys.maxsize} (got {value})")


def _number(value: float | None, flag: str, rule: str = "", *, low: float = -math.inf, high: float = math.inf) -> None:
    """Raise naming ``flag`` unless ``value`` is ``None`` or finite and within ``low`` and ``high`` (``rule``)."""
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        raise NSTError(f"{flag}: must be a finite number{rule} (got {value})")


def _optimisation_config(
    name: str, options: argparse.Namespace, data: dict[str, Any], objective: dict[str, Any]
) -> dict[str, Any]:
    """The shipped config ``name`` with the flags ``stylize`` and ``texture`` share, ``data`` and ``objective``."""
    _positive(options.size, "--size")
    _positive(options.steps, "--steps")
    check_seed(options.seed, "--seed")
    _number(options.style_weight, "--style-weight", " >= 0", low=0)
    _number(getattr(options, "content_weight", None), "--content-weight", " >= 0", low=0)
    for weight in getattr(options, "style_weights", None) or []:
        _number(weight, "--style-weights", " >= 0", low=0)
    for flag, value, choices in (
        ("--statistic", options.statistic, STATISTICS),
        ("--optimizer", options.optimizer, OPTIMIZERS),
        ("--parameterization", getattr(options, "parameterization", None) or "pixels", PARAMETERIZATIONS),
    ):
        if value not in choices:
            raise NSTError(f"{flag}: must be one of {', '.join(choices)} (got {value})")
    weights = getattr(options, "style_weights", None)
    if weights is not None:
        from lightning_nst.core.losses import check_style_weights  # torch: not for --help

        data = {**data, "style_weights": check_style_weights(weights, len(data["style"]), "--style-weights")}
    config = _shipped(name)
    config["seed_everything"] = options.seed
    trainer = config["trainer"]
    if options.steps is not None:
        trainer["max_steps"] = options.steps
    # The Python API (lightning_nst.stylize) passes no output: it writes no file.
    output = getattr(options, "output", None)
    if output is not None:
        _name_the_run(trainer, options.logs, Path(output).stem)
        writer = _writer(trainer, "ImageWriter")
        writer.update({"output": output, "overwrite": options.overwrite})
        if options.keep_partial:
            writer["keep_partial"] = True
    if getattr(options, "resume", None) is not None:
        config["ckpt_path"] = options.resume
    model = config["model"]["init_args"]
    model["vgg"]["weights"] = options.weights
    if getattr(options, "fill_missing", False):
        model["vgg"]["fill_missing"] = True
    model["init"] = options.init
    model["init_seed"] = options.seed
    if options.optimizer == "adam":
        model["optimizer"] = copy.deepcopy(ADAM)
    if getattr(options, "parameterization", None) is not None:
        model["parameterization"] = options.parameterization
    if options.style_weight is not None:
        objective["style_weight"] = options.style_weight
    (shipped_objective,) = model["objectives"]
    shipped_objective.update(objective)
    config["data"]["init_args"].update(data)
    if options.size is not None:
        config["data"]["init_args"]["size"] = options.size
    return config


def _name_the_run(trainer: dict[str, Any], logs: str, name: str) -> None:
    """Log under ``<logs>/<name>``: a run is named after what the user asked for (``-o``), not after the config."""
    logger = trainer["logger"]["init_args"]
    logger["save_dir"] = logs
    if name.strip(". "):
        logger["name"] = name


def _writer(trainer: dict[str, Any], kind: str) -> dict[str, Any]:
    """The ``init_args`` of the shipped config's writer (the last callback, of class ``kind``)."""
    writer = trainer["callbacks"][-1]
    if not str(writer.get("class_path", "")).endswith(kind):
        raise AssertionError(f"the shipped config's last callback is not its {kind}")
    return writer.setdefault("init_args", {})


def stylize_config(options: argparse.Namespace) -> dict[str, Any]:
    """``configs/style_transfer_<statistic>.yaml`` with the flags of ``lightning-nst stylize`` as overrides."""
    objective = {} if options.content_weight is None else {"content_weight": options.content_weight}
    color = getattr(options, "color", "keep")
    if color not in COLOR_MODES:
        raise NSTError(f"--color: must be one of {', '.join(COLOR_MODES)} (got {color})")
    if color != "keep":
        objective["color"] = color
    data = {"content": options.content, "style": list(options.style)}
    return _optimisation_config(f"style_transfer_{options.statistic}", options, data, objective)


def texture_config(options: argparse.Namespace) -> dict[str, Any]:
    """``configs/texture_<statistic>.yaml`` with the flags of ``lightning-nst texture`` as overrides."""
    return _optimisation_config(f"texture_{options.statistic}", options, {"style": list(options.texture)}, {})


def _family_of(model: str) -> str:
    """The family of ``--model``: its ``model_index.json``, read locally or fetched from the Hub (a small file)."""
    family = local_family(model, key="--model")
    if family is None:
        from lightning_nst.diffusion.loading import model_family  # imports diffusers: only for a Hub id

        family = model_family(model)
    return family


def generate_config(options: argparse.Namespace) -> dict[str, Any]:
    """The family's shipped config with the flags as overrides.

    ``configs/guided_diffusion.yaml`` for SD 1.x/2.x (``guided_img2img.yaml`` with ``--init-image``),
    ``guided_sdxl.yaml``, ``guided_sd3.yaml`` or ``guided_flux.yaml`` (with ``guided_img2img.yaml``'s strength for
    ``--init-image``).
    """
    _positive(options.size, "--size")
    _positive(options.steps, "--steps")
    if options.size is not None and options.size % 8:
        raise NSTError(f"--size: must be a multiple of 8 pixels (got {options.size})")
    for seed in options.seeds or [options.seed]:
        check_seed(seed, "--seeds" if options.seeds else "--seed", MAX_ITEM_SEED)
    _number(options.scale, "--scale")
    _number(options.cfg_scale, "--cfg-scale", " >= 0", low=0)
    _number(options.strength, "--strength", " in (0, 1]", low=math.ulp(0.0), high=1)
    if options.strength is not None and options.init_image is None:
        raise NSTError("--strength: needs --init-image (img2img)")
    family = options.family or (_family_of(options.model) if options.model is not None else "sd")
    if family == "sd" and options.init_image is not None:
        config = _shipped("guided_img2img")
    else:
        config = _shipped(FAMILY_CONFIGS[family])
        if options.init_image is not None:
            config["model"]["init_args"]["strength"] = _shipped("guided_img2img")["model"]["init_args"]["strength"]
    seeds = options.seeds if options.seeds is not None else [options.seed if options.seed is not None else 0]
    config["seed_everything"] = seeds[0] % (MAX_SEED + 1)  # each item's noise comes from its own seed
    trainer = config["trainer"]
    _name_the_run(trainer, options.logs, Path(options.output).expanduser().resolve().name)
    writer = _writer(trainer, "GenerationWriter")
    writer["output_dir"] = options.output
    writer["overwrite"] = options.overwrite
    model = config["model"]["init_args"]
    guidance = model["guidance"]["init_args"]
    for key, value in (
        ("model", options.model),
        ("num_inference_steps", options.steps),
        ("scheduler", options.sampler),
        ("cfg_scale", options.cfg_scale),
        ("height", options.size),
        ("width", options.size),
        ("strength", options.strength),
    ):
        if value is not None:
            model[key] = value
    if options.scale is not None:
        guidance["scale"] = options.scale
    if options.size is not None and guidance.get("guidance_size") and options.size < guidance["guidance_size"]:
        guidance["guidance_size"] = options.size  # no finer than the image itself
        layers = guidance.get("layers") or list(DEFAULT_STYLE_LAYERS)
        needed = min_input_size(list(layers))
        if options.size < needed:
            raise NSTError(
                f"--size: {options.size} px is too small for the style guidance, whose deepest layer "
                f"{max(layers, key=LAYER_NAMES.index)} needs images of at least {needed} px"
            )
    guidance["vgg"]["weights"] = options.weights
    if options.fill_missing:
        guidance["vgg"]["fill_missing"] = True
    data = config["data"]["init_args"]
    data.update({"prompts": list(options.prompt), "seeds": list(seeds), "style": list(options.style)})
    if options.init_image is not None:
        data["init_images"] = [options.init_image]
    return config


def config_yaml(config: dict[str, Any], command: str, argv: Sequence[str]) -> str:
    """``config`` as the YAML file ``lightning-nst <command> -c`` takes, headed by the shortcut it stands for."""
    head = f"# lightning-nst {shlex.join(argv)}\n# as a config: lightning-nst {command} -c this.yaml\n"
    return head + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def _run(command: str, config: dict[str, Any], resume: Callable[[Path], str] | None = None) -> Any:
    from lightning_nst.cli.lightning import run  # the CLI imports torch and Lightning: not for --help or bad flags

    # Inline JSON is YAML that --config takes as it is, so the run reads exactly the config --print-config prints.
    return run([command, "--config", json.dumps(config)], resume=resume)


def _run_folder(checkpoint: str) -> Path | None:
    """The unfinished run folder a resume from ``checkpoint`` writes into, as the CLI's ``resume_in_run_folder``."""
    from lightning_nst.core.files import checkpoint_run_folder
    from lightning_nst.outputs import SUMMARY

    folder = checkpoint_run_folder(checkpoint)
    return None if folder is None or (folder / SUMMARY).exists() else folder


def _check_output_file(output: Path, overwrite: bool, resume: str | None) -> None:
    """Refuse, before any work, an ``-o`` that exists unless ``--overwrite`` or it is the partial result resumed."""
    from lightning_nst.core.files import OutputFolder, check_output_dir
    from lightning_nst.core.images import image_format

    if not str(output).strip() or output == Path():
        raise NSTError("-o: is empty; name the image file to write, e.g. -o out.png")
    image_format(output, "-o")
    if output.is_dir():
        raise NSTError(f"-o: {output} is a folder; name the image file to write")
    if output.exists() and not overwrite:
        # A stopped run's --keep-partial image is recorded in its folder, which the resume writes into again.
        folder = _run_folder(resume) if resume is not None else None
        if folder is None or OutputFolder(folder, "-o").foreign([str(output.resolve())]):
            partial = " and is not the partial result of the run --resume finishes" if resume is not None else ""
            raise NSTError(f"-o: {output} exists{partial}; pass --overwrite to replace it")
    check_output_dir(output.parent, "-o")


def _check_not_an_input(output: Path, options: argparse.Namespace) -> None:
    """Refuse an ``-o`` that is one of the run's own input images, even with ``--overwrite``."""
    inputs = [("content image", getattr(options, "content", None)), ("init image", options.init)]
    inputs += [("style image", style) for style in getattr(options, "style", None) or getattr(options, "texture", [])]
    for what, source in inputs:
        if source is None or str(source).startswith(("sample:", "skimage:")):
            continue
        path = Path(source).expanduser()
        if output.exists() and path.exists() and os.path.samefile(output, path):
            raise NSTError(f"-o: {output} is the {what} of this run; write the result to another file")


def _optimise(
    argv: Sequence[str], parser: argparse.ArgumentParser, build: Any, options: argparse.Namespace | None = None
) -> None:
    command = parser.prog.split()[-1]
    options = parser.parse_args(argv) if options is None else options
    config = build(options)
    if options.print_config:
        print(config_yaml(config, "fit", [command, *argv]), end="")
        return
    output = Path(options.output).expanduser()
    _check_output_file(output, options.overwrite, options.resume)
    _check_not_an_input(output, options)
    from lightning_nst.cli.signals import without_option  # the run imports the CLI next anyway

    # A stop says how to finish into the same -o: this very command, with --resume and the checkpoint.
    base = ["lightning-nst", command, *without_option(argv, "--resume")]
    cli = _run("fit", config, resume=lambda checkpoint: shlex.join([*base, "--resume", str(checkpoint)]))
    from lightning_nst.nst.writer import ImageWriter

    writer = next(callback for callback in cli.trainer.callbacks if isinstance(callback, ImageWriter))
    run = Path(cli.trainer.log_dir)
    where = f"is in {run}" if writer.directory == run else f"is in {writer.directory} (TensorBoard: {run})"
    print(f"Wrote {output}; the run (TensorBoard, config, checkpoints) {where}", flush=True)


def _given(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, str]:
    """The options ``argv`` gives explicitly, as ``{dest: flag}`` (a value equal to the default counts as given)."""
    flags = {}
    for action in parser._actions:  # argparse has no public way to tell a default from a given value
        if action.option_strings:
            action.default = argparse.SUPPRESS
            flags[action.dest] = max(action.option_strings, key=len)
    return {dest: flags[dest] for dest in vars(parser.parse_intermixed_args(argv)) if dest in flags}


def stylize(argv: Sequence[str]) -> None:
    """``lightning-nst stylize CONTENT STYLE [STYLE ...] -o OUT`` (``argv`` after ``stylize``).

    With ``--network CKPT``, a trained fast style network stylizes CONTENT (an image, a folder or a video) instead.
    """
    parser = stylize_parser()
    # Intermixed: the style images may follow options, as they could when STYLE took one or more (nargs="+").
    options = parser.parse_intermixed_args(argv)
    given = _given(stylize_parser(), argv)
    if options.network is None:
        for dest in NETWORK_ONLY:
            if dest in given:
                raise NSTError(f"{given[dest]}: applies to a trained network only; add --network CKPT")
        if not options.style:
            parser.error("the following arguments are required: style")
        _optimise(argv, parser, stylize_config, options)
        return
    for dest, flag in given.items():
        if dest not in SHARED and dest not in NETWORK_ONLY:
            raise NSTError(f"{flag}: applies to the optimisation, not to --network (one forward pass of a trained "
                           "network); leave it out")  # fmt: skip
    _stylize_with_network(options)


def _stylize_with_network(options: argparse.Namespace) -> None:
    """``stylize ... --network CKPT``: an image, a folder or a video through a trained fast network."""
    _positive(options.size, "--size")
    _positive(options.style_size, "--style-size")
    _positive(options.batch_size, "--batch-size")
    _number(options.alpha, "--alpha", " in [0, 1]", low=0, high=1)
    for weight in options.style_weights or []:
        _number(weight, "--style-weights", " >= 0", low=0)
    if not options.output.strip():
        raise NSTError("-o: is empty; name the file (or, for a folder of images, the folder) to write")
    content = Path(options.content).expanduser()
    output = Path(options.output).expanduser()
    for index, style in enumerate(options.style):
        from lightning_nst.core.images import check_source

        check_source(style, f"style[{index}]")
    from lightning_nst.core.files import check_input_file

    check_input_file(options.network, "--network", "checkpoint")
    folder = content.is_dir()
    if folder:
        if output.exists() and not output.is_dir():
            raise NSTError(f"-o: {output} is a file; a folder of images is written into a folder")
    elif content.suffix.lower() in VIDEO_SUFFIXES:
        if output.exists() and not options.overwrite:
            raise NSTError(f"-o: {output} exists; pass --overwrite to replace it")
    else:
        _check_output_file(output, options.overwrite, None)
        _check_not_an_input(output, options)
    from lightning_nst.nst.fast import inference  # torch: only once the flags are checked

    network = inference.load_network(options.network, key="--network")
    settings = {
        "alpha": options.alpha,
        "style_weights": options.style_weights,
        "preserve_color": options.preserve_color,
        "style_size": inference.STYLE_SIZE if options.style_size is None else options.style_size,
        "device": options.device,
        "precision": options.precision,
    }
    style = list(options.style) or None
    what = network.describe()
    if folder:
        report = inference.stylize_folder(
            network, content, output, style, suffix=options.suffix, size=options.size,
            batch_size=options.batch_size, overwrite=options.overwrite, **settings,
        )  # fmt: skip
        line = report.summary(output)
        if report.failed:  # a run that wrote nothing, and found nothing written before, failed
            raise NSTError(f"content: {line}")
        print(f"{line[0].upper()}{line[1:]} ({what})", flush=True)
        return
    if content.suffix.lower() in VIDEO_SUFFIXES:
        frames = inference.stylize_video(network, content, output, style, size=options.size,
                                         overwrite=options.overwrite, **settings)  # fmt: skip
        print(f"Wrote {output}: {frames} frames ({what})", flush=True)
        return
    from lightning_nst.core.files import write_atomic
    from lightning_nst.core.images import encoded

    (image,) = inference.stylize_images(network, options.content, style, size=options.size, **settings)
    write_atomic(output, encoded(image, output, "-o"), overwrite=options.overwrite)
    print(f"Wrote {output} ({what})", flush=True)


VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm")
"""The content files ``stylize --network`` reads as videos (``inference.VIDEO_SUFFIXES``, without importing torch)."""


def export_parser() -> argparse.ArgumentParser:
    """The parser of ``lightning-nst export``."""
    parser = _Parser(
        prog="lightning-nst export",
        description="Write a trained fast style network's checkpoint as a TorchScript file that runs on any image "
        "size without lightning-nst (torch.jit.load, or libtorch in C++); its output is checked against the "
        "checkpoint's before the file is written, which names the network's kind and how to call it "
        "(the extra file lightning_nst_network.json).",
    )
    parser.add_argument("checkpoint", help="the network's checkpoint (.ckpt)")
    parser.add_argument("-o", "--output", required=True, help="the TorchScript file to write (.pt); never replaced")
    return parser


def export(argv: Sequence[str]) -> None:
    """``lightning-nst export CKPT -o OUT.pt`` (``argv`` after ``export``)."""
    options = export_parser().parse_args(argv)
    from lightning_nst.core.files import check_input_file

    check_input_file(options.checkpoint, "checkpoint", "checkpoint")
    if Path(options.output).expanduser().exists():
        raise NSTError(f"-o: {options.output} exists; an export never replaces a file, so remove it or name another")
    from lightning_nst.nst.fast.inference import export_torchscript, load_network

    network = load_network(options.checkpoint, key="checkpoint")
    path = export_torchscript(network, options.output)
    print(f"Wrote {path} ({network.describe()}; load it with torch.jit.load)", flush=True)


def texture(argv: Sequence[str]) -> None:
    """``lightning-nst texture TEXTURE -o OUT`` (``argv`` after ``texture``)."""
    _optimise(argv, texture_parser(), texture_config)


def generate(argv: Sequence[str]) -> None:
    """``lightning-nst generate PROMPT --style STYLE -o OUTDIR`` (``argv`` after ``generate``)."""
    options = generate_parser().parse_args(argv)
    config = generate_config(options)
    if options.print_config:
        print(config_yaml(config, "predict", ["generate", *argv]), end="")
        return
    if not options.output.strip():
        raise NSTError("-o: is empty; name the folder to write the images into, e.g. -o outputs/")
    output = Path(options.output).expanduser()
    if output.exists() and not output.is_dir():
        raise NSTError(f"-o: {output} is a file; generate writes a folder of images")
    cli = _run("predict", config)
    print(f"Images in {output}; the run (TensorBoard) is in {cli.trainer.log_dir}", flush=True)
