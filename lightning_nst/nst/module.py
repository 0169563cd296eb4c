"""The LightningModule whose parameter is the image: reconstruction, texture synthesis and style transfer."""

from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim import LBFGS, Adam, Optimizer
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from lightning_nst.core.color import (
    COLOR_MODES,
    ColorMode,
    combine_luminance,
    gray,
    luminance,
    match_color,
    match_histograms,
    match_luminance,
)
from lightning_nst.core.errors import DivergenceError, NSTError
from lightning_nst.core.files import source_digest
from lightning_nst.core.images import load_image
from lightning_nst.core.losses import STATISTICS, ContentLoss, Statistic, StyleLoss, total_variation
from lightning_nst.core.metrics import StyleDistance
from lightning_nst.core.seeds import check_seed
from lightning_nst.core.vgg import VGG19Features, VGGConfig, check_weight, layer_index, layer_weights, min_input_size
from lightning_nst.nst.checkpoint import (
    apply_optimizer_overrides,
    describe_overrides,
    optimizer_overrides,
    refuse_optimizer_overrides,
    seal,
    settings_of,
    verify,
    weights_identity,
)
from lightning_nst.nst.data import ImageTargets
from lightning_nst.nst.parameterization import ParameterizationName, make_parameterization
from lightning_nst.nst.scales import (
    IterateAverage,
    Scale,
    check_schedule,
    plan_scales,
    resize_image,
    resize_optimizer_state,
)
from lightning_nst.nst.tiling import Tile, TilePlan, exact_margin, tiled_features, tiled_style_moments, tiled_terms
from lightning_nst.nst.writer import ImageWriter
from lightning_nst.outputs import GRID

__all__ = ["DivergenceError", "ImageOptimization", "Objective", "ObjectiveResult", "default_optimizer"]

# Checkpoints hold the state after the step of their global_step, which is what resuming needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

_FLOAT32_MAX = torch.finfo(torch.float32).max
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Objective:
    """One image to optimise: which feature statistics it matches and how strongly.

    Layer lists weigh each layer ``1 / len(layers)``; a mapping ``{layer: weight}`` sets the weights explicitly.
    Losses are defined in :mod:`lightning_nst.core.losses`.

    Attributes:
        name: File-name-safe label used for the output PNG and the TensorBoard curves.
        content_layers: Layers whose features must match the content image (feature inversion, style transfer).
        content_weight: Weight of the content term.
        style_layers: Layers whose style statistic must match the style image(s).
        style_weight: Weight of the style term.
        statistic: ``"gram"`` (Gatys et al.), ``"meanvar"`` (per-channel mean and std, as in AdaIN), ``"w2"``
            (Gaussian Wasserstein-2) or ``"sliced_w"`` (sliced Wasserstein) (:class:`~lightning_nst.StyleLoss`).
        tv_weight: Weight of the total-variation smoothness term.
        color: ``"keep"`` (the style's colours), ``"luminance"`` (the objective is computed on luminance images,
            the style's luminance first matched to the content's mean and std, and the result is the optimised
            luminance with the content's chroma), ``"match"`` (the style images' colours are first matched to the
            content's mean and covariance, see :func:`lightning_nst.core.color.match_color`) or ``"histogram"`` (the
            result's channel histograms are matched to the content's after optimisation). All but ``"keep"`` need
            ``data.content``.
    """

    name: str
    content_layers: list[str] | dict[str, float] = field(default_factory=list)
    content_weight: float = 1.0
    style_layers: list[str] | dict[str, float] = field(default_factory=list)
    style_weight: float = 1.0
    statistic: Statistic = "gram"
    tv_weight: float = 0.0
    color: ColorMode = "keep"


# The images targets are computed from, per colour mode: keys of the loss modules beside statistic and layer.
_STYLE_VARIANT = {"keep": "rgb", "histogram": "rgb", "luminance": "luminance", "match": "match"}
_CONTENT_VARIANT = {"keep": "rgb", "histogram": "rgb", "luminance": "luminance", "match": "rgb"}


def _loss_key(*parts: str) -> str:
    """ModuleDict key of a target: ``"rgb"`` variants keep the names checkpoints and metrics have always used."""
    return "_".join(part for part in parts if part != "rgb")


def _check_objectives(objectives: list[Objective]) -> None:
    if not objectives:
        raise NSTError("model.objectives: give at least one objective")
    names: set[str] = set()
    for index, objective in enumerate(objectives):
        key = f"model.objectives[{index}]"
        if not _NAME.match(objective.name):
            raise NSTError(f"{key}.name: {objective.name!r} must be 1-64 letters, digits, '_', '-' or '.'")
        # Names are compared as a case-insensitive file system (macOS, Windows) compares the files they name.
        if objective.name.casefold() in names:
            raise NSTError(f"{key}.name: {objective.name!r} is used twice (file names ignore case on some systems)")
        names.add(objective.name.casefold())
        reserved = _reserved(objective.name)
        if reserved:
            raise NSTError(f"{key}.name: {objective.name!r} would write {reserved}, a file the run writes itself")
        if not objective.content_layers and not objective.style_layers:
            raise NSTError(f"{key}: give content_layers, style_layers or both")
        if objective.statistic not in STATISTICS:
            raise NSTError(f"{key}.statistic: must be one of {', '.join(STATISTICS)}, got {objective.statistic!r}")
        if objective.color not in COLOR_MODES:
            raise NSTError(f"{key}.color: must be one of {', '.join(COLOR_MODES)}, got {objective.color!r}")
        for term in ("content_weight", "style_weight", "tv_weight"):
            check_weight(getattr(objective, term), f"{key}.{term}")


def _reserved(name: str) -> str | None:
    """The file of a run that an objective named ``name`` would write over (its PNG or its interrupted image)."""
    folded = name.casefold()
    if folded == GRID.casefold().removesuffix(".png"):
        return GRID
    for suffix, kind in ((".interrupted", "interrupted"), (".last_good", "last good")):
        if folded.endswith(suffix):
            return f"the {kind} image of objective {name[: -len(suffix)]!r}"
    return None


def _nothing() -> None:
    pass


@dataclass
class ObjectiveResult:
    """What an objective ended with: the image to save and the numbers ``summary.json`` records about it.

    Attributes:
        image: The best image seen, ``(1, 3, H, W)`` in ``[0, 1]``.
        initial_loss: Loss terms at step 0 (empty if unknown).
        final_loss: Loss terms of ``image``.
        best_step: Step of ``image``.
        best_loss: Total loss of ``image``.
        last_loss: Total loss of the last step's image.
        stopped_at_step: Step at which the optimizer stopped moving the image, if it did.
        metrics: PSNR and SSIM against the content image, style distance against the style image(s).
    """

    image: Tensor
    initial_loss: dict[str, float]
    final_loss: dict[str, float]
    best_step: int
    best_loss: float
    last_loss: float
    stopped_at_step: int | None
    metrics: dict[str, float]


def _available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or ``None`` where it cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_optimizer(params: Any) -> Optimizer:
    """Adam with learning rate 0.02, a good default for pixels in ``[0, 1]``."""
    return Adam(params, lr=0.02)


class ImageOptimization(L.LightningModule):
    """Optimise pixels so that VGG19 features match targets: one image and one optimizer per objective.

    Each objective has its own image parameter and its own optimizer (L-BFGS history, step length, line search and
    stopping), and each step evaluates every objective separately with a VGG pass that stops at that objective's
    deepest layer. An objective therefore follows the same trajectory alone as inside any sweep. An objective whose
    optimizer no longer moves its image (L-BFGS converged) stops while the others go on; the run ends when all have
    stopped. The result of each objective is the best image seen (lowest total loss), not the last one. Content and
    style targets are computed once at the start of fitting.

    The module computes and never writes files: a :class:`lightning_nst.nst.writer.ImageWriter` in the trainer's
    callbacks writes the results, and :meth:`configure_callbacks` adds one with its defaults to a trainer that has
    none, so a trainer built in Python writes into its logger's run folder as ``lightning-nst fit`` does;
    :meth:`results` also returns the images. The VGG trunk is built in
    :meth:`configure_model`, which Lightning calls before restoring a checkpoint; used outside a trainer, the module
    builds it on the first call of :meth:`objective_loss`.

    Args:
        objectives: What to optimise; see :class:`Objective`. Several objectives make a sweep.
        vgg: Weights and pooling of the VGG19 trunk.
        init: ``"noise"`` (seeded uniform noise), ``"content"`` (the content image) or an image path/sample.
        init_seed: Seed of the noise initialisation.
        optimizer: Optimizer factory, e.g. ``torch.optim.LBFGS`` with its options in YAML; Adam(lr=0.02) by default.
            It is called once per objective, over that objective's image.
        parameterization: What the optimizer moves: ``"pixels"``, ``"laplacian"`` (a Laplacian pyramid, as STROTSS)
            or ``"fourier"`` (a 1/f-scaled, colour-decorrelated spectrum, as Distill's "Differentiable Image
            Parameterizations"); see :mod:`lightning_nst.nst.parameterization`. :attr:`images` holds the raw parameters;
            :meth:`decode` gives the image VGG sees and the writer saves.
        tile_size: Process images whose longer side exceeds this many px in tiles of at most this size, one at a
            time, so memory follows the tile size (see :mod:`lightning_nst.nst.tiling`); ``None``: never tile.
        tile_overlap: Pixels adjacent tiles share; tiled equals untiled up to rounding when ``tile_overlap // 2``
            reaches :func:`lightning_nst.nst.tiling.exact_margin` of the layers (e.g. 24 up to relu3_1, 64 up to
            relu4_1, 160 up to relu5_1).
        scales: Coarse-to-fine: long edges in pixels, ascending, the last the output's (data.size). Each scale
            starts from the previous one's image upsampled, with targets recomputed at its size (style images
            resized in proportion unless ``data.style_size`` is given), Adam's moments resized and L-BFGS restarted
            (:mod:`lightning_nst.nst.scales`). ``None``: one scale.
        scale_steps: Steps per scale, summing to ``trainer.max_steps``; ``None`` splits them evenly.
        avg_decay: With a value such as ``0.99``, the output is the bias-corrected exponential moving average of the
            last scale's iterates (and each scale starts from the previous one's average) instead of the best
            iterate.

    Attributes:
        content: The content image ``(1, 3, H, W)`` taken from the data module in :meth:`setup`, if any.
        style: The style images taken from the data module in :meth:`setup`.
        content_source: The content image's source (a path, ``sample:NAME`` or ``skimage:NAME``), as the data
            module names it.
        style_sources: The style images' sources.
        inputs: Content digests of the content, style and init images (see
            :func:`lightning_nst.core.files.source_digest`), recorded in checkpoints and ``summary.json``.
        last_good: The last finite image of each objective, ``(objectives, 3, H, W)``, once training started.
        has_good: Whether each objective's image was ever finite.
    """

    def __init__(
        self,
        objectives: list[Objective],
        vgg: VGGConfig | None = None,
        init: str = "noise",
        init_seed: int = 0,
        optimizer: OptimizerCallable = default_optimizer,
        parameterization: ParameterizationName = "pixels",
        tile_size: int | None = None,
        tile_overlap: int = 64,
        scales: list[int] | None = None,
        scale_steps: list[int] | None = None,
        avg_decay: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.automatic_optimization = False  # one optimizer, closure and step per objective
        _check_objectives(objectives)
        check_seed(init_seed, "model.init_seed")
        self.parameterization = make_parameterization(parameterization)
        check_schedule(scales, scale_steps, avg_decay)
        self.scales, self.scale_steps, self.avg_decay = scales, scale_steps, avg_decay
        self.schedule: list[Scale] = []  # planned in setup
        self.scale = 0  # index of the current scale
        self._full_inputs: tuple[Any, ...] | None = None  # content, style, masks, style masks at the output size
        self._style_size_fixed = False
        self._scale_records: list[dict[str, Any]] = []
        self._scale_clock = 0.0
        self.average: list[IterateAverage] | None = None
        self._scale_carried = 0.0  # seconds a resumed scale had already run
        self.objectives = objectives
        # Keyed by layer (and statistic) and by the colour variant of the target images: (layer, variant) and
        # (statistic, layer, variant).
        self.content_weights: dict[tuple[str, str], list[float]] = {}
        self.style_weights: dict[tuple[str, str, str], list[float]] = {}
        for index, objective in enumerate(objectives):
            key = f"model.objectives[{index}]"
            content_variant, style_variant = _CONTENT_VARIANT[objective.color], _STYLE_VARIANT[objective.color]
            for layer, weight in layer_weights(objective.content_layers, f"{key}.content_layers").items():
                slot = self.content_weights.setdefault((layer, content_variant), [0.0] * len(objectives))
                slot[index] = objective.content_weight * weight
            for layer, weight in layer_weights(objective.style_layers, f"{key}.style_layers").items():
                target = (objective.statistic, layer, style_variant)
                self.style_weights.setdefault(target, [0.0] * len(objectives))[index] = objective.style_weight * weight
        self.tv_weights = [objective.tv_weight for objective in objectives]
        self.layers = sorted({*(layer for layer, _ in self.content_weights), *(t[1] for t in self.style_weights)})
        self.tile_plan = self._check_tiling(tile_size, tile_overlap)
        self.vgg_config = vgg or VGGConfig()
        self.vgg: VGG19Features | None = None  # built in configure_model: loading weights is the heavy part
        self.init = init
        self.init_seed = init_seed
        self.optimizer_factory = optimizer
        self.images = nn.ParameterList()
        self.content_losses = nn.ModuleDict()
        self.style_losses = nn.ModuleDict()
        self.strict_loading = False  # checkpoints leave out the frozen VGG weights
        self.content: Tensor | None = None
        self.style: list[Tensor] = []
        self.blend_weights: list[float] | None = None
        self.masks: list[Tensor] | None = None
        self.style_masks: list[Tensor | None] | None = None
        self.content_source: str | None = None
        self.style_sources: list[str] = []
        self.inputs: dict[str, Any] | None = None
        self._target_sizes: list[int | None] | None = None
        self._initial: dict[str, dict[str, float]] | None = None
        self._current: dict[str, dict[str, float]] = {}
        self.last_good: Tensor | None = None
        self.has_good: list[bool] = []
        self.best_images: Tensor | None = None
        self.best_loss: list[float] = []
        self.best_step: list[int] = []
        self.stopped_at: list[int | None] = []
        self._saved_generators: dict[str, Tensor] | None = None

    def _generators(self) -> dict[str, torch.Generator]:
        """The style losses' own random generators by module name (sliced_w's projections)."""
        return {
            name: module.generator
            for name, module in self.style_losses.named_modules()
            if isinstance(getattr(module, "generator", None), torch.Generator)
        }

    def _check_tiling(self, tile_size: int | None, tile_overlap: int) -> TilePlan | None:
        if isinstance(tile_overlap, bool) or not isinstance(tile_overlap, int) or tile_overlap < 0:
            raise NSTError(f"model.tile_overlap: must be a whole number >= 0, got {tile_overlap!r}")
        if tile_size is None:
            return None
        plan = TilePlan(tile_size, tile_overlap, tuple(sorted(self.layers, key=layer_index)))
        for index, objective in enumerate(self.objectives):
            if objective.statistic == "sliced_w":
                # Sorted projections are not sums over positions, so tiles cannot be accumulated into them.
                raise NSTError(
                    f"model.tile_size: tiling needs a style statistic that is a sum over positions (gram, meanvar, "
                    f"w2); model.objectives[{index}].statistic is sliced_w"
                )
        if not plan.exact:
            rank_zero_info(
                f"model.tile_overlap {tile_overlap}: below {2 * exact_margin(plan.layers)} px the tiles' border "
                "features see padding, not their neighbours; the grid moves every step so no seam stays put"
            )
        return plan

    # -- the pixels -------------------------------------------------------------------------------------------

    def decode(self, parameter: Tensor) -> Tensor:
        """The image a parameter stands for, in ``[0, 1]``: what VGG sees (a line search's trial points too)."""
        return self.parameterization.decode(parameter)

    def encode(self, image: Tensor) -> Tensor:
        """The raw parameter that decodes to ``image`` ``(1, 3, H, W)`` in ``[0, 1]`` (any size)."""
        return self.parameterization.encode(image).contiguous()

    def render(self, index: int, image: Tensor) -> Tensor:
        """The colour image objective ``index`` makes of a decoded ``(B, 3, H, W)`` image: what is saved and shown.

        With ``color: luminance`` it is the image's luminance with the content's chroma; otherwise the image itself.
        """
        if self.objectives[index].color == "luminance" and self.content is not None:
            return combine_luminance(luminance(image), self.content.to(image.device))
        return image

    def vgg_input(self, index: int, image: Tensor) -> Tensor:
        """What VGG sees of objective ``index``'s colour image: its luminance as grey RGB for ``color: luminance``."""
        return gray(luminance(image)) if self.objectives[index].color == "luminance" else image

    @property
    def image(self) -> Tensor | None:
        """The current images, one per objective, as one ``(objectives, 3, H, W)`` tensor in ``[0, 1]``."""
        if not len(self.images):
            return None
        return torch.cat([self.render(i, self.decode(parameter.detach())) for i, parameter in enumerate(self.images)])

    # -- setup ------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build the frozen VGG19 trunk for the objectives' layers (once)."""
        if self.vgg is None:
            self.vgg = self.vgg_config.build(self.layers, key="model.vgg")

    def _take_targets_from_data_module(self) -> tuple[int, int]:
        """Copy the target images, their digests and sizes from the trainer's ImageTargets; return the image shape.

        The only place the module reads the data module: Lightning has run its ``setup`` already.
        """
        data = self.trainer.datamodule if self._trainer is not None else None
        if not isinstance(data, ImageTargets):
            raise NSTError("data: ImageOptimization needs `data: {class_path: lightning_nst.ImageTargets, ...}`")
        for index, objective in enumerate(self.objectives):
            if objective.content_layers and data.content_source is None:
                raise NSTError(f"model.objectives[{index}] ({objective.name}) has content layers: set data.content")
            if objective.style_layers and not data.style_sources:
                raise NSTError(f"model.objectives[{index}] ({objective.name}) has style layers: set data.style")
            if objective.color != "keep" and data.content_source is None:
                raise NSTError(f"model.objectives[{index}].color: {objective.color!r} needs data.content")
        data.check_min_size(min_input_size(self.layers))
        if self.tile_plan is not None and data.masks is not None:
            # A masked statistic weighs positions by a mask resized to each layer's whole grid, not a sum of tiles.
            raise NSTError("model.tile_size: tiling does not support data.masks; leave one of them out")
        self.content = data.content
        self.style = list(data.style)
        self.content_source = str(data.content_source) if data.content_source is not None else None
        self.style_sources = [str(source) for source in data.style_sources]
        self.blend_weights = data.style_weights
        self.masks, self.style_masks = data.masks, data.style_masks
        self._target_sizes = [data.size, data.style_size]
        self._style_size_fixed = data.style_size_fixed
        self.inputs = {
            "data.content": source_digest(data.content_source) if data.content_source is not None else None,
            "data.style": [source_digest(source) for source in data.style_sources],
        }
        for key, sources in (("data.masks", data.mask_sources), ("data.style_masks", data.style_mask_sources)):
            if sources is not None:
                self.inputs[key] = [source_digest(source) if source is not None else None for source in sources]
        if data.style_weights is not None:
            self.inputs["data.style_weights"] = list(data.style_weights)
        return data.output_shape

    def setup(self, stage: str) -> None:
        """Create one image parameter per objective, shaped like the content image (or the first style image)."""
        if len(self.images):
            return
        height, width = self._take_targets_from_data_module()
        if self.init == "noise":
            generator = torch.Generator().manual_seed(self.init_seed)
            start = torch.rand(1, 3, height, width, generator=generator)
        elif self.init == "content":
            if self.content is None:
                raise NSTError("model.init: 'content' needs data.content")
            start = self.content
        else:
            start = load_image(self.init, max(height, width), key="model.init")
            start = torch.nn.functional.interpolate(start, size=(height, width), mode="bilinear", antialias=True)
            assert self.inputs is not None
            self.inputs["model.init"] = source_digest(self.init)
        if self.scales is not None:
            start = self._plan_scales(height, width, start)
        for _ in self.objectives:
            self.images.append(nn.Parameter(self.encode(start.clamp(0, 1))))

    def configure_callbacks(self) -> list[L.Callback]:
        """A default :class:`~lightning_nst.nst.writer.ImageWriter` when the trainer has a logger and no writer.

        The results then go where Lightning logs (``lightning_logs/version_<n>`` by default), so a second run goes
        to a new folder. A trainer without a logger has no run folder: it writes results only through a writer it
        was given, and :meth:`results` returns them (what ``lightning_nst.stylize`` does). A writer given to the
        trainer (or by a config) is kept with its options: Lightning would replace it with one returned here.
        """
        if self.trainer.logger is None or any(isinstance(c, ImageWriter) for c in self.trainer.callbacks):
            return []
        return [ImageWriter()]

    def configure_optimizers(self) -> list[Optimizer]:
        """Build the optimizer chosen in the config once per objective, each over that objective's image."""
        optimizers = []
        for parameter in self.images:
            try:
                optimizer = self.optimizer_factory([parameter])
            except (TypeError, ValueError) as error:  # torch's own checks, e.g. "Invalid learning rate: -1.0"
                key = "model.optimizer.init_args.lr" if "learning rate" in str(error) else "model.optimizer"
                raise NSTError(f"{key}: {error}") from None
            for group in optimizer.param_groups:
                # torch accepts lr=inf (and LBFGS any lr), which turns the image into NaN at the first step.
                lr = group.get("lr")
                if isinstance(lr, int | float) and not (math.isfinite(lr) and lr > 0):
                    raise NSTError(f"model.optimizer.init_args.lr: must be a finite number > 0, got {lr}")
                # A setting beyond float32 (the image's dtype) makes torch's update raise an overflow RuntimeError.
                for name, value in group.items():
                    if isinstance(value, float) and math.isfinite(value) and abs(value) > _FLOAT32_MAX:
                        raise NSTError(
                            f"model.optimizer.init_args.{name}: {value:g} is beyond float32, the image's precision "
                            f"(at most {_FLOAT32_MAX:.4g})"
                        )
                # torch only checks this inside the first step, after the setup, as a RuntimeError traceback.
                line_search = group.get("line_search_fn", None)
                if isinstance(optimizer, LBFGS) and line_search not in (None, "strong_wolfe"):
                    raise NSTError(
                        f"model.optimizer.init_args.line_search_fn: must be strong_wolfe or null, got {line_search!r}"
                    )
            if isinstance(optimizer, LBFGS) and self._grad_scaler() is not None:
                # Lightning raises "AMP and the LBFGS optimizer are not compatible" only at the first step.
                raise NSTError(
                    f"trainer.precision: {self.trainer.precision} scales the loss with a gradient scaler, which "
                    "L-BFGS cannot use; choose bf16-mixed or 32-true, or model.optimizer Adam"
                )
            optimizers.append(optimizer)
        self._check_lbfgs_memory(optimizers)
        return optimizers

    def _check_lbfgs_memory(self, optimizers: list[Optimizer]) -> None:
        """Refuse an L-BFGS history larger than the memory available, before the first step (not tiled: whole)."""
        history = sum(
            2 * group["history_size"] * self._largest_numel(group["params"][0])
            for optimizer in optimizers
            if isinstance(optimizer, LBFGS)
            for group in optimizer.param_groups
        )
        available = _available_bytes()
        if history and available is not None and 4 * history > available:
            sizes = sorted(
                {group["history_size"] for o in optimizers for group in o.param_groups if "history_size" in group}
            )
            raise NSTError(
                f"model.optimizer: L-BFGS with history_size {', '.join(map(str, sizes))} keeps 2 x history_size "
                f"image-sized tensors, {4 * history / 1e9:.3g} GB at the largest size, more than the "
                f"{available / 1e9:.3g} GB of memory available; use Adam (as configs/large_print.yaml does) or a "
                "smaller history_size"
            )

    def _largest_numel(self, parameter: Tensor) -> int:
        """Elements of ``parameter`` at the last scale's size (L-BFGS restarts at each scale with a new history)."""
        if not self.schedule:
            return parameter.numel()
        height, width = self.parameterization.image_size(parameter.shape)
        last = self.schedule[-1]
        return math.ceil(parameter.numel() * last.height * last.width / (height * width))

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        """The gradient scaler of Lightning's ``16-mixed`` precision, if this run has one."""
        if self._trainer is None:
            return None
        return getattr(self.trainer.precision_plugin, "scaler", None)

    @torch.no_grad()
    def on_fit_start(self) -> None:
        """Compute target features once, on the training device, and report which VGG weights are in use."""
        vgg = self._trunk()
        if self.scales is not None:
            self._scale_clock = time.perf_counter()
        self._compute_targets()
        if self._saved_generators:  # a resumed run draws on where the checkpoint's sliced_w projections were
            for name, generator in self._generators().items():
                if name in self._saved_generators:
                    generator.set_state(self._saved_generators[name])
            self._saved_generators = None
        rank_zero_info(f"VGG19 weights: {vgg.weights_used}")
        if self.logger is not None:
            self.logger.log_hyperparams({"vgg_weights": vgg.weights_used})
            if isinstance(self.logger, TensorBoardLogger):
                self.logger.experiment.add_text("vgg_weights", vgg.weights_used)

    @torch.no_grad()
    def _compute_targets(self) -> None:
        """Content and style targets from the current content and style images (at the current scale).

        One VGG pass per colour variant of the images, up to the layers that variant's targets use. When tiling
        applies, both go tile by tile: the content targets keep only the content layers' features at full size
        (relu4_2: 512 channels at 1/8 of each side, 2.7 times the image's floats); the style targets keep only each
        layer's statistic, accumulated from tile sums (:func:`~lightning_nst.nst.tiling.tiled_style_moments`).
        """
        if self.content is not None and self.content_weights:
            for variant in {variant for _, variant in self.content_weights}:
                layers = [layer for layer, v in self.content_weights if v == variant]
                features = self._features(self.target_images("content", variant)[0], layers)
                for layer in layers:
                    self.content_losses[_loss_key(layer, variant)] = ContentLoss(features[layer])
        for variant in {variant for _, _, variant in self.style_weights}:
            keys = [(statistic, layer) for statistic, layer, v in self.style_weights if v == variant]
            images = self.target_images("style", variant)
            if self._tiles_style(images):
                moments = [self._style_moments(image, keys) for image in images]
                for statistic, layer in keys:
                    target = [image_moments[statistic, layer] for image_moments in moments]
                    loss = StyleLoss.from_moments(target, statistic, weights=self.blend_weights)
                    self.style_losses[_loss_key(statistic, layer, variant)] = loss
                continue
            layers = sorted({layer for _, layer in keys}, key=layer_index)
            styles = [self._trunk()(image, layers) for image in images]
            for statistic, layer in keys:
                target = [features[layer] for features in styles]
                self.style_losses[_loss_key(statistic, layer, variant)] = self._style_loss(target, statistic)

    def _tiles_style(self, images: list[Tensor]) -> bool:
        """Whether the style targets are accumulated tile by tile: tiling applies to a style image, no masks."""
        plan = self.tile_plan
        unmasked = self.masks is None and not any(mask is not None for mask in self.style_masks or [])
        return plan is not None and unmasked and any(plan.applies(image) for image in images)

    def _style_moments(
        self, image: Tensor, keys: list[tuple[Statistic, str]]
    ) -> dict[tuple[Statistic, str], tuple[Tensor | None, Tensor]]:
        """A style image's moments per ``(statistic, layer)``, tile by tile when tiling applies to it."""
        assert self.tile_plan is not None
        height, width = image.shape[-2:]
        whole = [Tile(0, height, 0, width, 0, height, 0, width, height, width)]  # a small image of a blend
        tiles = self.tile_plan.tiles(height, width) if self.tile_plan.applies(image) else whole
        return tiled_style_moments(self._trunk(), image, keys, tiles)

    # -- coarse to fine (lightning_nst.nst.scales) ----------------------------------------------------------------

    def _plan_scales(self, height: int, width: int, start: Tensor) -> Tensor:
        """Plan the scales for an output of ``height x width``; return the start image at the first scale's size."""
        self.schedule = plan_scales(
            self.scales or [], self.scale_steps, (height, width), self.trainer.max_steps, min_input_size(self.layers)
        )
        self._full_inputs = (self.content, list(self.style), self.masks, self.style_masks)
        self._use_scale_inputs(0)  # callbacks' on_fit_start may already render the image (luminance: content chroma)
        first = self.schedule[0]
        if self.init == "noise":
            generator = torch.Generator().manual_seed(self.init_seed)
            return torch.rand(1, 3, first.height, first.width, generator=generator)
        return resize_image(start, (first.height, first.width))

    def _use_scale_inputs(self, index: int) -> None:
        """Content, style images and masks at scale ``index``'s size (style in proportion unless its size is fixed)."""
        assert self._full_inputs is not None
        content, styles, masks, style_masks = self._full_inputs
        scale = self.schedule[index]
        shape = (scale.height, scale.width)
        factor = scale.long_edge / self.schedule[-1].long_edge
        self.content = resize_image(content, shape) if content is not None else None
        self.masks = [resize_image(mask, shape) for mask in masks] if masks is not None else None
        if not self._style_size_fixed:
            shapes = [(max(1, round(s.shape[-2] * factor)), max(1, round(s.shape[-1] * factor))) for s in styles]
            min_side = min_input_size(self.layers)
            for (height, width), source in zip(shapes, self.style_sources, strict=True):
                if min(height, width) < min_side:
                    raise NSTError(
                        f"model.scales: at {scale.long_edge} px the style image {source} shrinks to {width}x{height}, "
                        f"below the {min_side} px the deepest layer needs; start larger or set data.style_size"
                    )
            styles = [resize_image(style, shape) for style, shape in zip(styles, shapes, strict=True)]
            if style_masks is not None:
                style_masks = [
                    resize_image(mask, shape) if mask is not None else None
                    for mask, shape in zip(style_masks, shapes, strict=True)
                ]
        self.style, self.style_masks = list(styles), style_masks

    def _due_scale(self) -> int | None:
        """The next scale's index when it is due at this step: its planned start, or all objectives stopped."""
        following = self.scale + 1
        if self.scales is None or following >= len(self.schedule):
            return None
        stopped = bool(self.stopped_at) and all(at is not None for at in self.stopped_at)
        return following if self.global_step >= self.schedule[following].start or stopped else None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Enter the next scale when it is due (:meth:`_enter_scale`)."""
        due = self._due_scale()
        if due is not None:
            self._enter_scale(due)

    @torch.no_grad()
    def _enter_scale(self, index: int) -> None:
        """Move to scale ``index``: upsampled images, targets at its size, optimizers rebuilt with resized moments.

        Adam's moments are carried (resized) for ``parameterization: pixels`` only; otherwise every optimizer
        restarts. Done in ``on_train_batch_start`` rather than in ``training_step``: Lightning 2.6's
        manual-optimization loop (``loops/optimization/manual.py``, ``on_run_start``) installs its step-counting
        hooks on ``trainer.strategy._lightning_optimizers`` just before ``training_step``, and
        ``Strategy.setup_optimizers`` (``strategies/strategy.py``) rebuilds that list through its ``optimizers``
        setter from :meth:`configure_optimizers`, so optimizers replaced here are counted like the first ones.
        """
        self._close_scale_record()
        scale = self.schedule[index]
        shape = (scale.height, scale.width)
        old_shape = self.images[0].shape
        states = [optimizer.state_dict() for optimizer in self.trainer.optimizers]
        for i, parameter in enumerate(self.images):
            source = self.average[i].get() if self.average is not None else self.decode(parameter.detach())
            self.images[i] = nn.Parameter(self.encode(resize_image(source, shape)).contiguous())
        self.scale = index
        self._use_scale_inputs(index)
        self._compute_targets()
        self.trainer.strategy.setup_optimizers(self.trainer)
        # L-BFGS restarts: its curvature pairs belong to the old size. Adam's moments are images only for pixels; a
        # Laplacian pyramid's or a spectrum's moments resized as images would mean nothing, so those restart too.
        if self.parameterization.name == "pixels":
            for optimizer, state in zip(self.trainer.optimizers, states, strict=True):
                if not isinstance(optimizer, LBFGS):
                    optimizer.load_state_dict(resize_optimizer_state(state, old_shape, shape))
        image = self.image
        self.last_good = image.clone()
        self._start_best(image)  # losses at different sizes do not compare: the best is sought per scale
        self.average = self._new_average()
        self._scale_clock = time.perf_counter()
        rank_zero_info(f"step {self.global_step}: scale {index + 1}/{len(self.schedule)}, {scale.width}x{scale.height}")

    def _new_average(self) -> list[IterateAverage] | None:
        if self.avg_decay is None:
            return None
        return [IterateAverage(self.decode(p.detach()), self.avg_decay) for p in self.images]

    def _close_scale_record(self) -> None:
        """Record the scale that ends now: its size, steps and seconds (of this process, for a resumed run)."""
        self._scale_records.append(self._current_scale_record())
        self._scale_carried = 0.0

    def _current_scale_record(self) -> dict[str, Any]:
        scale = self.schedule[self.scale]
        started = self._scale_records[-1]["end_step"] if self._scale_records else 0
        return {
            "long_edge": scale.long_edge,
            "size": [scale.height, scale.width],
            "steps": self.global_step - started,
            "end_step": self.global_step,
            "seconds": round(time.perf_counter() - self._scale_clock + self._scale_carried, 4),
        }

    @property
    def scale_records(self) -> list[dict[str, Any]] | None:
        """Each scale run so far: ``long_edge``, ``size`` ``[H, W]``, ``steps``, ``end_step`` and ``seconds``."""
        if self.scales is None or not self.schedule:
            return None
        return [*self._scale_records, self._current_scale_record()]

    def _features(self, image: Tensor, layers: list[str]) -> dict[str, Tensor]:
        """``layers``' features of a target image, assembled tile by tile when tiling applies to it."""
        if self.tile_plan is None or not self.tile_plan.applies(image):
            return self._trunk()(image, layers)
        return tiled_features(self._trunk(), image, layers, self.tile_plan.tiles(*image.shape[-2:]))

    def _style_loss(self, target: list[Tensor], statistic: Statistic) -> StyleLoss | nn.ModuleList:
        """One blended target, or with masks one masked loss per region (summed by :meth:`style_term`)."""
        if self.masks is None:
            return StyleLoss(target, statistic, weights=self.blend_weights, target_masks=self.style_masks)
        regions = nn.ModuleList()
        style_masks = self.style_masks or [None] * len(target)
        for index, (features, mask, style_mask) in enumerate(zip(target, self.masks, style_masks, strict=True)):
            try:
                regions.append(StyleLoss(features, statistic, target_masks=[style_mask], mask=mask.to(features.device)))
            except ValueError as error:  # the mask checks in losses.py; data.py refuses the known cases first
                key = "data.style_masks" if str(error).startswith("target_masks") else "data.masks"
                raise NSTError(f"{key}[{index}]: {error}") from None
        return regions

    @staticmethod
    def style_term(loss: StyleLoss | nn.ModuleList, features: Tensor) -> Tensor:
        """A layer's style loss ``(B,)``: the blended target's, or the sum of the regions' masked losses."""
        if isinstance(loss, nn.ModuleList):
            return torch.stack([region(features) for region in loss]).sum(dim=0)
        return loss(features)

    def target_images(self, role: str, variant: str) -> list[Tensor]:
        """The content (``role="content"``) or style images, on the module's device, as a colour variant sees them.

        ``"rgb"``: as loaded; ``"luminance"``: luminance as grey RGB, a style's first matched to the content's mean
        and std; ``"match"``: style images with the content's colour mean and covariance (clamped to ``[0, 1]``).
        """
        images = [self.content] if role == "content" else list(self.style)
        images = [image.to(self.device) for image in images if image is not None]
        content = self.content.to(self.device) if self.content is not None else None
        if variant == "luminance":
            if role == "content" or content is None:
                return [gray(luminance(image)) for image in images]
            return [gray(match_luminance(luminance(image), luminance(content))) for image in images]
        if variant == "match" and content is not None:
            return [match_color(image, content).clamp(0, 1) for image in images]
        return images

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen VGG weights; keep the initial losses, the best images and which objectives stopped.

        The weights come from the config and can be hundreds of MB; the rest lets a resumed run end exactly as an
        uninterrupted one. Lightning saves the per-objective optimizer states itself.
        """
        state = checkpoint["state_dict"]
        for key in [key for key in state if key.startswith("vgg.")]:
            del state[key]
        optimizer = self.trainer.optimizers[0] if self._trainer is not None and self.trainer.optimizers else None
        image = self.image
        checkpoint["lightning_nst"] = {
            "initial_loss": self._initial,
            # What the image depends on besides the hyperparameters: a resumed run refuses to continue if it changed.
            "inputs": self.inputs,
            "size": self._target_sizes,
            "image_shape": list(image.shape) if image is not None else None,
            "parameterization": self.parameterization.name,
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "best_images": self.best_images.detach().cpu() if self.best_images is not None else None,
            "best_loss": list(self.best_loss),
            "best_step": list(self.best_step),
            "stopped_at": list(self.stopped_at),
            # The weights actually loaded (a file's with its sha256 prefix), not the config's choice, e.g. ``auto``.
            "vgg_weights": self.vgg.weights_used if self.vgg is not None else None,
            # The random projections of sliced_w targets: a resume draws the ones the run would have drawn next.
            "generators": {name: generator.get_state() for name, generator in self._generators().items()},
        }
        if self.schedule:
            checkpoint["lightning_nst"]["scales"] = {
                "plan": [scale.as_dict() for scale in self.schedule],
                "scale": self.scale,
                "records": self._scale_records,
                "carried_s": time.perf_counter() - self._scale_clock + self._scale_carried,
                "average": [average.state_dict() for average in self.average] if self.average is not None else None,
            }
        seal(checkpoint)  # Lightning calls this hook last, so the digest covers everything it writes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint made for another image shape or other VGG weights; restore the best images.

        :func:`~lightning_nst.nst.checkpoint.check_checkpoint` refuses most of this before any heavy work; here, after
        :meth:`setup` and :meth:`configure_model`, the shape and the weights actually loaded are known for certain
        (``auto`` resolved), also for a trainer built in Python.
        """
        where = f"ckpt_path: {self.trainer.ckpt_path}" if self._trainer is not None else "checkpoint"
        verify(checkpoint, where)
        state = checkpoint.get("lightning_nst", {})
        self._take_optimizer_settings(checkpoint, state.get("optimizer"), where)
        saved_name = state.get("parameterization", "pixels")  # checkpoints from before it was recorded: pixels
        if saved_name != self.parameterization.name:
            raise NSTError(
                f"{where} was made with model.parameterization {saved_name}, this run gives "
                f"{self.parameterization.name}; a resumed run cannot change it (start a new run without --ckpt_path, "
                "or give the checkpoint's model.parameterization)"
            )
        self._restore_scale(state.get("scales"), where)
        for index, parameter in enumerate(self.images):
            saved = checkpoint.get("state_dict", {}).get(f"images.{index}")
            if saved is not None and saved.shape != parameter.shape:
                (saved_h, saved_w), (h, w) = map(self.parameterization.image_size, (saved.shape, parameter.shape))
                raise NSTError(
                    f"{where} holds a {saved_w}x{saved_h} image, this run's data makes {w}x{h}; a resumed run "
                    "cannot change the image size (start a new run without --ckpt_path, or give the checkpoint's "
                    "data.size)"
                )
        recorded = state.get("vgg_weights")  # None in checkpoints saved before it was recorded: those still load
        used = self.vgg.weights_used if self.vgg is not None else None
        if recorded and used and weights_identity(recorded) != weights_identity(used):
            raise NSTError(
                f"{where} was made with VGG weights {recorded}, but this run's model.vgg.weights gives {used}; a "
                "resumed run cannot change the weights (start a new run without --ckpt_path, or give the "
                "checkpoint's weights)"
            )
        self._initial = state.get("initial_loss")
        self._saved_generators = state.get("generators")
        if state.get("best_images") is not None:
            self.best_images = state["best_images"]
            self.best_loss = list(state["best_loss"])
            self.best_step = list(state["best_step"])
            self.stopped_at = list(state["stopped_at"])

    def _take_optimizer_settings(self, checkpoint: dict[str, Any], saved_class: str | None, where: str) -> None:
        """Put this run's optimizer settings into the checkpoint's optimizer states, which Lightning restores next.

        Lightning would restore the saved ``param_groups`` whole, silently dropping a new ``lr``: the settings
        :data:`~lightning_nst.nst.checkpoint.APPLIED_ON_RESUME` names are taken from this run, the others must not
        differ.
        """
        states = checkpoint.get("optimizer_states") or []
        if not states:
            return
        try:
            built, fresh = settings_of(self.optimizer_factory)
        except (TypeError, ValueError):
            return  # configure_optimizers names the bad setting
        if saved_class is not None and saved_class != built:
            raise NSTError(
                f"{where} was saved with model.optimizer {saved_class}, this run gives {built}; a resumed run cannot "
                "change it (start a new run without --ckpt_path, or give the checkpoint's optimizer)"
            )
        changed = optimizer_overrides(states, fresh)
        refuse_optimizer_overrides(changed, where)
        if changed:
            apply_optimizer_overrides(states, changed)
            rank_zero_info(f"Resuming with {describe_overrides(changed)}")

    def _restore_scale(self, saved: dict[str, Any] | None, where: str) -> None:
        """Put the images at the checkpoint's scale, or refuse a checkpoint of another coarse-to-fine schedule."""
        if saved is None and not self.schedule:
            return
        if saved is None or not self.schedule:
            made = "without" if saved is None else "with"
            raise NSTError(
                f"{where} was made {made} model.scales, this run is not; a resumed run cannot change the scales "
                "(start a new run without --ckpt_path, or give the checkpoint's model.scales)"
            )
        plan = [scale.as_dict() for scale in self.schedule]
        if saved["plan"] != plan:
            describe = ", ".join(f"{s['long_edge']} px x {s['steps']}" for s in saved["plan"])
            raise NSTError(
                f"{where} was made with the scales {describe} (model.scales, model.scale_steps, trainer.max_steps), "
                "this run plans others; a resumed run cannot change them (give the checkpoint's values)"
            )
        self.scale = int(saved["scale"])
        self._use_scale_inputs(self.scale)
        scale = self.schedule[self.scale]
        for i, parameter in enumerate(self.images):  # load_state_dict then fills them
            self.images[i] = nn.Parameter(parameter.new_zeros(1, 3, scale.height, scale.width))
        self._scale_records = list(saved["records"])
        self._scale_carried = float(saved["carried_s"])
        if saved.get("average") is not None:
            self.average = [IterateAverage.from_state(average, self.device) for average in saved["average"]]

    # -- the objective ----------------------------------------------------------------------------------------

    def _trunk(self) -> VGG19Features:
        self.configure_model()
        assert self.vgg is not None
        return self.vgg

    def _objective_layers(self, index: int) -> list[str]:
        layers = [layer for (layer, _), weights in self.content_weights.items() if weights[index] > 0]
        return layers + [layer for (_, layer, _), weights in self.style_weights.items() if weights[index] > 0]

    def objective_loss(self, index: int, image: Tensor) -> dict[str, Tensor]:
        """Weighted loss terms and their ``total`` for objective ``index`` at one image of shape ``(1, 3, H, W)``.

        Keys are ``content_<layer>``, ``style_<statistic>_<layer>``, ``tv`` (the terms the objective uses) and
        ``total``. The VGG pass stops at the objective's deepest layer, so the value does not depend on the other
        objectives of the run. Builds the VGG trunk first if :meth:`configure_model` has not run. Without autograd
        and with ``tile_size`` smaller than the image, the terms are computed tile by tile.
        """
        if not torch.is_grad_enabled() and self.tile_plan is not None and self.tile_plan.applies(image):
            return self._tiled_objective(index, image, backward=False)
        features = self._trunk()(self.vgg_input(index, image), self._objective_layers(index))
        terms: dict[str, Tensor] = {}
        for (layer, variant), weights in self.content_weights.items():
            key = _loss_key(layer, variant)
            if weights[index] > 0 and key in self.content_losses:
                terms[f"content_{layer}"] = weights[index] * self.content_losses[key](features[layer])[0]
        for (statistic, layer, variant), weights in self.style_weights.items():
            if weights[index] > 0:
                loss = self.style_term(self.style_losses[_loss_key(statistic, layer, variant)], features[layer])[0]
                terms[f"style_{statistic}_{layer}"] = weights[index] * loss
        if self.tv_weights[index] > 0:
            terms["tv"] = self.tv_weights[index] * total_variation(image)[0]
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms

    def _tiled_objective(self, index: int, image: Tensor, backward: bool) -> dict[str, Tensor]:
        """:meth:`objective_loss`'s terms (detached), computed tile by tile (:mod:`~lightning_nst.nst.tiling`).

        With ``backward`` it also backpropagates their gradient into the image parameter. The grid offset is drawn
        from ``init_seed`` and the global step, so a resumed run draws the same offsets.
        """
        assert self.tile_plan is not None
        seen = self.vgg_input(index, image)
        content = {
            layer: (weights[index], self.content_losses[_loss_key(layer, variant)])
            for (layer, variant), weights in self.content_weights.items()
            if weights[index] > 0 and _loss_key(layer, variant) in self.content_losses
        }
        style = {
            layer: (weights[index], self.style_losses[_loss_key(statistic, layer, variant)])
            for (statistic, layer, variant), weights in self.style_weights.items()
            if weights[index] > 0
        }
        generator = torch.Generator().manual_seed(self.init_seed * 1_000_003 + self.global_step)
        tiles = self.tile_plan.tiles(*seen.shape[-2:], self.tile_plan.random_offset(generator))
        values, grad = tiled_terms(self._trunk(), seen, content, style, tiles, gradient=backward)
        statistic = self.objectives[index].statistic
        terms = {f"content_{layer}": value for layer, value in values["content"].items()}
        terms.update({f"style_{statistic}_{layer}": value for layer, value in values["style"].items()})
        surrogate = None if grad is None else (seen * grad).sum()
        if self.tv_weights[index] > 0:
            tv = self.tv_weights[index] * total_variation(image)[0]
            terms["tv"] = tv.detach()
            surrogate = None if surrogate is None else surrogate + tv
        terms["total"] = torch.stack(list(terms.values())).sum()
        if surrogate is not None:
            # Its gradient is the terms' gradient: the image gradient of the VGG terms, pulled through render/decode.
            self.manual_backward(surrogate)
        return terms

    def _closure(self, index: int, optimizer: Any, first: list[dict[str, Tensor]]) -> Tensor:
        optimizer.zero_grad()
        image = self.render(index, self.decode(self.images[index]))
        tiled = self.tile_plan is not None and self.tile_plan.applies(image)
        terms = self._tiled_objective(index, image, backward=True) if tiled else self.objective_loss(index, image)
        if not torch.isfinite(terms["total"]):
            term, value = next((t, v.item()) for t, v in terms.items() if not torch.isfinite(v) and t != "total")
            raise DivergenceError(self.global_step, self.objectives[index].name, term, value)
        if not first:
            first.append({term: value.detach() for term, value in terms.items()})
        if not tiled:
            self.manual_backward(terms["total"])
        return terms["total"].detach()

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        """One optimizer step per objective that has not stopped, each with a closure over its own image only."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        step = self.global_step
        counted = False
        for index, (objective, optimizer) in enumerate(zip(self.objectives, optimizers, strict=True)):
            if self.stopped_at[index] is not None:
                continue
            parameter = self.images[index]
            before = parameter.detach().clone()
            first: list[dict[str, Tensor]] = []
            hooks = optimizer._on_before_step, optimizer._on_after_step
            scaler = self._grad_scaler()
            scale = scaler.get_scale() if scaler is not None else None
            if counted:
                # Lightning counts every manual optimizer.step as a global step; a step of all objectives is one.
                # Lightning 2.6 has no public switch for this: its manual loop installs these two hooks itself.
                optimizer._on_before_step = optimizer._on_after_step = _nothing
            try:
                optimizer.step(closure=partial(self._closure, index, optimizer, first))
            finally:
                optimizer._on_before_step, optimizer._on_after_step = hooks
            counted = True
            start = {term: value.item() for term, value in first[0].items()}
            self._current[objective.name] = start
            if step == 0:
                self._initial = {**(self._initial or {}), objective.name: start}
            if start["total"] < self.best_loss[index]:
                self.best_loss[index] = start["total"]
                self.best_step[index] = step
                self.best_images[index] = self.render(index, self.decode(before))[0]
            with torch.no_grad():
                self.parameterization.project_(parameter)  # pixels: projected gradient descent onto [0, 1]
                if bool(torch.isfinite(parameter).all()):
                    self.last_good[index] = self.render(index, self.decode(parameter))[0]
                    self.has_good[index] = True
                # 16-mixed: the scaler skips a step with non-finite gradients and lowers its scale; not a stop.
                skipped = scaler is not None and scaler.get_scale() < scale
                if torch.equal(before, parameter) and not skipped:
                    self.stopped_at[index] = step
                    rank_zero_info(
                        f"step {step}: objective {objective.name} stopped, its optimizer no longer moves the image "
                        f"(loss {start['total']:.4g})"
                    )
        if self.average is not None:
            with torch.no_grad():
                for average, parameter in zip(self.average, self.images, strict=True):
                    average.update(self.decode(parameter))
        if (not counted or all(at is not None for at in self.stopped_at)) and self._due_scale() is None:
            self.trainer.should_stop = True  # unless a next scale follows: it starts at the next step
        total = sum(row["total"] for row in self._current.values())
        self._log_terms(step, total)
        # The progress bar's; the loggers get it from _log_terms, since through self.log Lightning would add a flat
        # `epoch` curve (a fit is one epoch) to every step's scalars.
        self.log("loss", total, on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=1)

    def _log_terms(self, step: int, total: float) -> None:
        """Write each objective's loss terms and best loss (``<objective>/<term>``) and the ``loss`` to the loggers.

        Straight to the loggers, on the steps Lightning writes logs (every ``trainer.log_every_n_steps``; the CLI
        sets 1): ``self.log_dict`` costs about a millisecond per key and step in Lightning's result collection,
        several percent of a 256 px step (``benchmarks/step_overhead.py --price-logging``). The terms are therefore
        not in ``trainer.callback_metrics``; the total ``loss`` is, logged with ``self.log``.
        """
        every = self.trainer.log_every_n_steps
        if not self.loggers or not every or ((step + 1) % every and not self.trainer.should_stop):
            return
        metrics = {f"{name}/{term}": value for name, row in self._current.items() for term, value in row.items()}
        metrics.update({f"{o.name}/best": loss for o, loss in zip(self.objectives, self.best_loss, strict=True)})
        metrics["loss"] = total
        if self.schedule:
            metrics["scale"] = float(self.schedule[self.scale].long_edge)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    # -- progress and results ---------------------------------------------------------------------------------

    def _start_best(self, image: Tensor) -> None:
        """No best image yet: every objective's best is ``image``, at an infinite loss, and none has stopped."""
        self.best_images = image.clone()
        self.best_loss = [math.inf] * len(self.objectives)
        self.best_step = [0] * len(self.objectives)
        self.stopped_at = [None] * len(self.objectives)

    def on_train_start(self) -> None:  # noqa: D102
        image = self.image
        self.last_good = image.clone()
        self.has_good = self._finite_rows(image).tolist()
        if self.best_images is None:
            self._start_best(image)
        self.best_images = self.best_images.to(self.device)
        if self.average is None:
            self.average = self._new_average()

    @staticmethod
    def _finite_rows(images: Tensor) -> Tensor:
        return torch.isfinite(images.detach()).flatten(1).all(1)

    def check_finite(self, what: str) -> None:
        """Raise instead of letting a NaN or infinite image be saved (a PNG would show it as black).

        Args:
            what: What therefore did not happen, e.g. ``"no result was saved"``; the message says it.
        """
        finite = self._finite_rows(self.image).tolist()
        if not all(finite):
            names = ", ".join(o.name for o, ok in zip(self.objectives, finite, strict=True) if not ok)
            raise NSTError(
                f"step {self.global_step}: the image of objective {names} holds non-finite values, so {what}; "
                f"lower the learning rate (model.optimizer) or the weights (model.objectives)"
            )

    @torch.no_grad()
    def results(self) -> list[ObjectiveResult]:
        """Each objective's best image, its loss terms and metrics; raises if an image is not finite.

        The last step's image competes with the best ones seen during training (and becomes the best state when it
        wins): ``best_step``/``best_loss`` are those of the image returned, ``last_loss`` is the last image's.
        """
        self.check_finite("no result was saved")
        steps = self.trainer.global_step
        image = self.image
        if self.best_images is None:  # a run that never trained
            self._start_best(image)
        best = self.best_images.to(image.device)
        last: list[float] = []
        # Terms of a result image already evaluated here: a large (tiled) image's loss is a pass over all its tiles.
        known: dict[int, dict[str, float]] = {}
        for index in range(len(self.objectives)):
            terms = {term: value.item() for term, value in self.objective_loss(index, image[index : index + 1]).items()}
            total = terms["total"]
            last.append(total)
            if self.average is not None:  # the average is the output (crowsonkb's avg_decay), not the best iterate
                average = self.render(index, self.average[index].get().to(image.device))
                known[index] = {term: value.item() for term, value in self.objective_loss(index, average).items()}
                self.best_loss[index] = known[index]["total"]
                self.best_step[index] = steps
                best[index] = average[0]
            elif total < self.best_loss[index]:
                self.best_loss[index], self.best_step[index] = total, steps
                best[index] = image[index]
                known[index] = terms
        self.best_images = best
        results = []
        for index, objective in enumerate(self.objectives):
            result = best[index : index + 1].float()
            final_loss = known.get(index) if best.dtype == torch.float32 else None
            if final_loss is None:
                final_loss = {term: value.item() for term, value in self.objective_loss(index, result).items()}
            if objective.color == "histogram" and self.content is not None:
                # A post-step: the losses are those of the optimised image, the metrics those of the image returned.
                result = match_histograms(result, self.content.to(result.device).float())
            results.append(
                ObjectiveResult(
                    image=result,
                    initial_loss=(self._initial or {}).get(objective.name, {}),
                    final_loss=final_loss,
                    best_step=self.best_step[index],
                    best_loss=self.best_loss[index],
                    last_loss=last[index],
                    stopped_at_step=self.stopped_at[index],
                    metrics=self.metrics(index, result),
                )
            )
        return results

    def _ssim(self, image: Tensor, target: Tensor) -> float:
        """Torchmetrics' SSIM, over bands of rows about a tile in area when tiling applies to the image.

        Its maps take 2.9 GB at 2048 px (11.7 at 4096). It is the mean of a map of local SSIMs, each from an 11 px
        Gaussian window over the reflect-padded image, so a band of rows grown by ``pad = 5`` px on each side (the
        image's own rows, or its reflection at the image's border, as in the whole pass) gives the map's rows of
        its core exactly; their sum over the bands divided by the map's size is the whole image's SSIM.
        """
        if self.tile_plan is None or not self.tile_plan.applies(image):
            return structural_similarity_index_measure(image, target, data_range=1.0).item()
        pad, height = 5, image.shape[-2]
        rows = max(16, self.tile_plan.tile_size**2 // image.shape[-1])
        total = 0.0
        for r0 in range(0, height, rows):
            r1 = min(r0 + rows, height)
            top, bottom = max(0, r0 - pad), min(height, r1 + pad)
            _, local = structural_similarity_index_measure(
                image[..., top:bottom, :], target[..., top:bottom, :], data_range=1.0, return_full_image=True
            )
            total += local[..., r0 - top : r1 - top, :].double().sum().item()
        return total / image[0].numel()

    def metrics(self, index: int, image: Tensor) -> dict[str, float]:
        """PSNR and SSIM against the content image, and the style distance, of objective ``index``'s ``image``.

        The style distance reuses the style targets computed in :meth:`on_fit_start`.
        """
        objective = self.objectives[index]
        metrics: dict[str, float] = {}
        if objective.content_layers and self.content is not None:
            target = self.content.to(image.device)
            metrics["psnr"] = peak_signal_noise_ratio(image, target, data_range=1.0).item()
            metrics["ssim"] = self._ssim(image, target)
        if objective.style_layers:
            layers = layer_weights(objective.style_layers, "style_layers")
            variant = _STYLE_VARIANT[objective.color]
            targets = {layer: self.style_losses[_loss_key(objective.statistic, layer, variant)] for layer in layers}
            seen = self.vgg_input(index, image)
            if self.tile_plan is not None and self.tile_plan.applies(seen):
                tiles = self.tile_plan.tiles(*seen.shape[-2:])
                style = {layer: (w, targets[layer]) for layer, w in layers.items()}
                values, _ = tiled_terms(self._trunk(), seen, {}, style, tiles, gradient=False)
                value = torch.stack(list(values["style"].values())).sum().item()
            elif self.masks is None:
                distance = StyleDistance(self._trunk(), targets, objective.statistic, list(layers), layers)
                distance.update(self.vgg_input(index, image))
                value = distance.compute().item()
            else:  # StyleDistance has one target per layer; masked regions have one each
                features = self._trunk()(self.vgg_input(index, image), list(layers))
                terms = [w * self.style_term(targets[layer], features[layer])[0] for layer, w in layers.items()]
                value = torch.stack(terms).sum().item()
            metrics[f"style_distance_{objective.statistic}"] = value
        return metrics
