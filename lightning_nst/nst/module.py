"""The LightningModule whose parameter is the image: reconstruction, texture synthesis and style transfer."""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_nst.core.errors import DivergenceError, NSTError
from lightning_nst.core.files import source_digest
from lightning_nst.core.seeds import check_seed
from lightning_nst.core.vgg import VGG19Features, VGGConfig, min_input_size
from lightning_nst.nst.checkpoint import (
    read_resume_state,
    refuse_other_image,
    refuse_other_parameterization,
    save_resume_state,
    take_optimizer_settings,
)
from lightning_nst.nst.data import ImageTargets, initial_image
from lightning_nst.nst.evaluator import make_evaluator
from lightning_nst.nst.objective import LossWeights, Objective, check_objectives, render, variant_images
from lightning_nst.nst.optimizers import build_optimizers, check_lbfgs_memory, default_optimizer
from lightning_nst.nst.parameterization import ParameterizationName, make_parameterization
from lightning_nst.nst.results import ObjectiveResult, Progress, check_finite
from lightning_nst.nst.safeguard import (
    LBFGSSafeguard,
    check_safeguard_factor,
    guarded,
    record_actual_step,
    safeguard_factors,
)
from lightning_nst.nst.scales import CoarseToFine, ScaleInputs, check_schedule
from lightning_nst.nst.writer import ImageWriter

__all__ = ["ImageOptimization"]

# Checkpoints hold the state after the step of their global_step, which is what resuming needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def _progress_field(name: str, doc: str) -> Any:
    """A read-only attribute of the module that is ``progress``'s field ``name`` (what the writer reads)."""
    return property(lambda self: getattr(self.progress, name), doc=doc)


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

    The jobs beside the Lightning hooks live in their own modules: :mod:`~lightning_nst.nst.objective` (what an
    objective is), :mod:`~lightning_nst.nst.evaluator` (targets, loss and metrics, whole or tiled),
    :mod:`~lightning_nst.nst.optimizers`, :mod:`~lightning_nst.nst.safeguard` (L-BFGS's),
    :mod:`~lightning_nst.nst.scales` (coarse to fine),
    :mod:`~lightning_nst.nst.results` (best images and what the writer reads) and
    :mod:`~lightning_nst.nst.checkpoint` (the resume state).

    Args:
        objectives: What to optimise; see :class:`~lightning_nst.nst.objective.Objective`. Several make a sweep.
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
        lbfgs_safeguard: With L-BFGS (one iteration per step, no line search, as the configs'): its curvature pairs
            record the steps actually taken after clipping, and a step whose image has a loss above this factor
            times the objective's best so far is undone and the following steps shortened
            (:mod:`lightning_nst.nst.safeguard`); rejections are logged as ``<objective>/rejected``. E.g. ``2.0``
            for every objective. ``"auto"`` (the default): ``2.0`` for the reconstructions of block-1 layers
            (content only, conv1_1..relu1_2), where plain L-BFGS jumps hundreds of times above its best and ends
            higher, and plain L-BFGS for every other objective, where it measured lower losses. ``None``: plain
            torch L-BFGS everywhere, as the PyTorch tutorial's (``docs/benchmarks.md``, "L-BFGS that keeps its
            progress").

    Attributes:
        content: The content image ``(1, 3, H, W)`` taken from the data module in :meth:`setup`, if any.
        style: The style images taken from the data module in :meth:`setup`.
        content_source: The content image's source (a path, ``sample:NAME`` or ``skimage:NAME``), as the data
            module names it.
        style_sources: The style images' sources.
        inputs: Content digests of the input images (``ImageTargets.digests``), kept in checkpoints and summaries.
        progress: Losses, best images and stops (:class:`~lightning_nst.nst.results.Progress`): ``best_images``,
            ``best_loss``, ``best_step``, ``stopped_at``, ``last_good`` and ``has_good`` are its.
        evaluator: The whole or tiled evaluation (:mod:`~lightning_nst.nst.evaluator`).
        coarse: The scales and iterate average (:class:`~lightning_nst.nst.scales.CoarseToFine`).
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
        lbfgs_safeguard: float | Literal["auto"] | None = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.automatic_optimization = False  # one optimizer, closure and step per objective
        check_objectives(objectives)
        check_seed(init_seed, "model.init_seed")
        check_safeguard_factor(lbfgs_safeguard)
        self.parameterization = make_parameterization(parameterization)
        check_schedule(scales, scale_steps, avg_decay)
        self.scales, self.scale_steps, self.avg_decay = scales, scale_steps, avg_decay
        self.coarse = CoarseToFine(scales, scale_steps, avg_decay)
        self.objectives = objectives
        self.weights = LossWeights.of(objectives)
        self.layers = self.weights.layers
        self.vgg_config = vgg or VGGConfig()
        self.vgg: VGG19Features | None = None  # built in configure_model: loading weights is the heavy part
        self.init = init
        self.init_seed = init_seed
        self.optimizer_factory = optimizer
        self.images = nn.ParameterList()
        self.content_losses = nn.ModuleDict()
        self.style_losses = nn.ModuleDict()
        self.evaluator = make_evaluator(
            tile_size, tile_overlap, objectives, self.weights, self._trunk, self.content_losses, self.style_losses,
            init_seed,
        )  # fmt: skip
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
        self.progress = Progress(len(objectives))
        factors = safeguard_factors(lbfgs_safeguard, objectives)
        self.safeguard = LBFGSSafeguard(factors) if any(f is not None for f in factors) else None
        self._saved_generators: dict[str, Tensor] | None = None

    best_images = _progress_field("best_images", "The best image of each objective so far.")
    best_loss = _progress_field("best_loss", "Each objective's best total loss so far.")
    best_step = _progress_field("best_step", "The step of each objective's best image.")
    stopped_at = _progress_field("stopped_at", "The step each objective stopped at, or ``None``.")
    last_good = _progress_field("last_good", "The last finite image of each objective, once training started.")
    has_good = _progress_field("has_good", "Whether each objective's image was ever finite.")
    _current = _progress_field("current", "Each objective's loss terms at the latest step.")
    _initial = _progress_field("initial", "Each objective's loss terms at step 0.")

    # -- the pixels -------------------------------------------------------------------------------------------

    def decode(self, parameter: Tensor) -> Tensor:
        """The image a parameter stands for, in ``[0, 1]``: what VGG sees (a line search's trial points too)."""
        return self.parameterization.decode(parameter)

    def encode(self, image: Tensor) -> Tensor:
        """The raw parameter that decodes to ``image`` ``(1, 3, H, W)`` in ``[0, 1]`` (any size)."""
        return self.parameterization.encode(image).contiguous()

    def render(self, index: int, image: Tensor) -> Tensor:
        """The colour image objective ``index`` makes of a decoded image: what is saved and shown."""
        return render(self.objectives[index], image, self.content)

    @property
    def image(self) -> Tensor | None:
        """The current images, one per objective, as one ``(objectives, 3, H, W)`` tensor in ``[0, 1]``."""
        if not len(self.images):
            return None
        return torch.cat([self.render(i, self.decode(parameter.detach())) for i, parameter in enumerate(self.images)])

    def target_images(self, role: str, variant: str) -> list[Tensor]:
        """The content (``role="content"``) or style images, on the module's device, as a colour variant sees them.

        See :func:`~lightning_nst.nst.objective.variant_images`.
        """
        images = [self.content] if role == "content" else list(self.style)
        images = [image.to(self.device) for image in images if image is not None]
        content = self.content.to(self.device) if self.content is not None else None
        return variant_images(images, content, variant, role)

    # -- setup ------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build the frozen VGG19 trunk for the objectives' layers (once)."""
        if self.vgg is None:
            self.vgg = self.vgg_config.build(self.layers, key="model.vgg")

    def _trunk(self) -> VGG19Features:
        self.configure_model()
        assert self.vgg is not None
        return self.vgg

    def _take_targets_from_data_module(self) -> tuple[int, int]:
        """Copy the target images, their digests and sizes from the trainer's ImageTargets; return the image shape.

        The only place the module reads the data module: Lightning has run its ``setup`` already.
        """
        data = self.trainer.datamodule if self._trainer is not None else None
        if not isinstance(data, ImageTargets):
            raise NSTError("data: ImageOptimization needs `data: {class_path: lightning_nst.ImageTargets, ...}`")
        data.check_objectives(self.objectives)
        data.check_min_size(min_input_size(self.layers))
        self.evaluator.check_masks(data.masks)
        self.content, self.style = data.content, list(data.style)
        self.content_source = str(data.content_source) if data.content_source is not None else None
        self.style_sources = [str(source) for source in data.style_sources]
        self.blend_weights = data.style_weights
        self.masks, self.style_masks = data.masks, data.style_masks
        self._target_sizes = [data.size, data.style_size]
        self._style_size_fixed = data.style_size_fixed
        self.inputs = data.digests()
        return data.output_shape

    def setup(self, stage: str) -> None:
        """Create one image parameter per objective, shaped like the content image (or the first style image)."""
        if len(self.images):
            return
        shape = self._take_targets_from_data_module()
        start = initial_image(self.init, self.init_seed, shape, self.content)
        if self.init not in ("noise", "content"):
            self.inputs = {**(self.inputs or {}), "model.init": source_digest(self.init)}
        if self.scales is not None:
            full = (self.content, list(self.style), self.masks, self.style_masks)
            min_side = min_input_size(self.layers)
            self.coarse.plan(shape, self.trainer.max_steps, min_side, full, self._style_size_fixed, self.style_sources)
            # Callbacks' on_fit_start may already render the image (luminance: the content's chroma at this size).
            self._use_inputs(self.coarse.inputs(0))
            start = self.coarse.first_image(start, self.init_seed if self.init == "noise" else None)
        for _ in self.objectives:
            self.images.append(nn.Parameter(self.encode(start.clamp(0, 1))))

    def _use_inputs(self, inputs: ScaleInputs) -> None:
        """Target images at the current scale's size (:meth:`~lightning_nst.nst.scales.CoarseToFine.inputs`)."""
        self.content, self.style, self.masks, self.style_masks = inputs

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
        """Build the optimizer chosen in the config once per objective, each over that objective's image.

        Settings torch would refuse only at the first step, and an L-BFGS history beyond the memory available, are
        refused here (:mod:`lightning_nst.nst.optimizers`).
        """
        scaled = self._grad_scaler() is not None
        precision = self.trainer.precision if self._trainer is not None else None
        optimizers = build_optimizers(self.optimizer_factory, list(self.images), scaled, precision)
        check_lbfgs_memory(optimizers, partial(self.coarse.largest_numel, image_size=self.parameterization.image_size))
        return optimizers

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
            self.coarse.start_clock()
        self._compute_targets()
        if self._saved_generators:  # a resumed run draws on where the checkpoint's sliced_w projections were
            self.evaluator.restore_generators(self._saved_generators)
            self._saved_generators = None
        rank_zero_info(f"VGG19 weights: {vgg.weights_used}")
        if self.logger is not None:
            self.logger.log_hyperparams({"vgg_weights": vgg.weights_used})
            if isinstance(self.logger, TensorBoardLogger):
                self.logger.experiment.add_text("vgg_weights", vgg.weights_used)

    def _compute_targets(self) -> None:
        """Content and style targets from the current content and style images (at the current scale)."""
        self.evaluator.compute_targets(
            self.target_images, self.content is not None, self.masks, self.style_masks, self.blend_weights
        )

    def on_train_start(self) -> None:  # noqa: D102
        self.progress.start(self.image)
        if self.coarse.average is None:
            self.coarse.start_average([self.decode(parameter.detach()) for parameter in self.images])

    # -- coarse to fine (lightning_nst.nst.scales) ----------------------------------------------------------------

    @property
    def scale_records(self) -> list[dict[str, Any]] | None:
        """Each scale run so far: ``long_edge``, ``size`` ``[H, W]``, ``steps``, ``end_step`` and ``seconds``."""
        return self.coarse.records(self.global_step)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Enter the next scale when it is due (:meth:`_enter_scale`)."""
        due = self.coarse.due(self.global_step, self.progress.all_stopped)
        if due is not None:
            self._enter_scale(due)

    @torch.no_grad()
    def _enter_scale(self, index: int) -> None:
        """Move to scale ``index``: targets at its size, images upsampled, optimizers rebuilt with resized moments.

        Done in ``on_train_batch_start`` rather than in ``training_step``: the optimizers that
        :meth:`~lightning_nst.nst.scales.CoarseToFine.resize` rebuilds are then the ones Lightning's
        manual-optimization loop steps next.
        """
        scale = self.coarse.enter(index, self.global_step)
        self._use_inputs(self.coarse.inputs(index))
        self._compute_targets()
        self.coarse.resize(self.images, self.parameterization, self.trainer)
        image = self.image
        self.progress.last_good = image.clone()
        self.progress.start_best(image)  # losses at different sizes do not compare: the best is sought per scale
        if self.safeguard is not None:
            self.safeguard.reset()
        self.coarse.start_clock()
        rank_zero_info(
            f"step {self.global_step}: scale {index + 1}/{len(self.coarse.schedule)}, {scale.width}x{scale.height}"
        )

    # -- checkpoints (lightning_nst.nst.checkpoint) -------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen VGG weights; keep the initial losses, the best images and which objectives stopped.

        The rest lets a resumed run end exactly as an uninterrupted one. Lightning saves the per-objective optimizer
        states itself. The state is versioned and sealed (:func:`~lightning_nst.nst.checkpoint.save_resume_state`).
        """
        optimizer = self.trainer.optimizers[0] if self._trainer is not None and self.trainer.optimizers else None
        image = self.image
        state = {
            # What the image depends on besides the hyperparameters: a resumed run refuses to continue if it changed.
            "inputs": self.inputs,
            "size": self._target_sizes,
            "image_shape": list(image.shape) if image is not None else None,
            "parameterization": self.parameterization.name,
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            **self.progress.state_dict(),
            # The weights actually loaded (a file's with its sha256 prefix), not the config's choice, e.g. ``auto``.
            "vgg_weights": self.vgg.weights_used if self.vgg is not None else None,
            # The random projections of sliced_w targets: a resume draws the ones the run would have drawn next.
            "generators": {name: generator.get_state() for name, generator in self.evaluator.generators().items()},
            # What a resume with trainer.precision unset takes (lightning_nst.cli.precision), so it computes alike.
            "precision": str(self.trainer.precision) if self._trainer is not None else None,
        }
        scales = self.coarse.state_dict()
        if scales is not None:
            state["scales"] = scales
        if self.safeguard is not None:
            state["safeguard"] = self.safeguard.state_dict()
        save_resume_state(checkpoint, state)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of a newer version, or made for another image shape or other VGG weights; restore it.

        :func:`~lightning_nst.nst.checkpoint.check_checkpoint` refuses most of this before any heavy work; here, after
        :meth:`setup` and :meth:`configure_model`, the shape and the weights actually loaded are known for certain
        (``auto`` resolved), also for a trainer built in Python. This run's optimizer settings are put into the
        checkpoint's optimizer states (:func:`~lightning_nst.nst.checkpoint.take_optimizer_settings`).
        """
        where = f"ckpt_path: {self.trainer.ckpt_path}" if self._trainer is not None else "checkpoint"
        state = read_resume_state(checkpoint, where)
        take_optimizer_settings(checkpoint, self.optimizer_factory, state.get("optimizer"), where)
        refuse_other_parameterization(state, self.parameterization.name, where)
        if self.coarse.restore(state.get("scales"), where, self.images):
            self._use_inputs(self.coarse.inputs(self.coarse.scale))
        used = self.vgg.weights_used if self.vgg is not None else None
        refuse_other_image(checkpoint, list(self.images), self.parameterization.image_size, used, where)
        self.progress.load_state_dict(state)
        if self.safeguard is not None and state.get("safeguard") is not None:
            self.safeguard.load_state_dict(state["safeguard"], self.images[0].device)
        self._saved_generators = state.get("generators")

    # -- the step ---------------------------------------------------------------------------------------------

    def objective_loss(self, index: int, image: Tensor) -> dict[str, Tensor]:
        """Loss terms (``content_<layer>``, ``style_<statistic>_<layer>``, ``tv``) and ``total`` of objective ``index``.

        At one image ``(1, 3, H, W)``, as :meth:`~lightning_nst.nst.evaluator.Evaluator.loss` computes them (tile by
        tile without autograd where ``tile_size`` is smaller than the image); builds the VGG trunk if needed.
        """
        return self.evaluator.loss(index, image, self.global_step)

    def _closure(self, index: int, optimizer: Any, first: list[dict[str, Tensor]]) -> Tensor:
        optimizer.zero_grad()
        image = self.render(index, self.decode(self.images[index]))
        terms, backward = self.evaluator.step_loss(index, image, self.global_step)
        if not torch.isfinite(terms["total"]):
            term, value = next((t, v.item()) for t, v in terms.items() if not torch.isfinite(v) and t != "total")
            raise DivergenceError(self.global_step, self.objectives[index].name, term, value)
        if not first:
            first.append({term: value.detach() for term, value in terms.items()})
        self.manual_backward(backward)
        return terms["total"].detach()

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        """One optimizer step per objective that has not stopped, each with a closure over its own image only."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        step = self.global_step
        counted = False
        progress = self.progress
        for index, (objective, optimizer) in enumerate(zip(self.objectives, optimizers, strict=True)):
            if progress.stopped_at[index] is not None:
                continue
            parameter = self.images[index]
            before = parameter.detach().clone()
            first: list[dict[str, Tensor]] = []
            scaler = self._grad_scaler()
            scale = scaler.get_scale() if scaler is not None else None
            closure = partial(self._closure, index, optimizer, first)
            safeguard = self.safeguard
            if safeguard is not None and not (safeguard.guards(index) and guarded(optimizer.optimizer)):
                safeguard = None
            if safeguard is not None:
                safeguard.before_step(optimizer.optimizer)
            if counted:
                # Lightning counts every LightningOptimizer.step as a global step; a step of all objectives is one.
                # The strategy's public optimizer_step is that step (precision plugin, hooks, clipping) uncounted.
                self.trainer.strategy.optimizer_step(optimizer.optimizer, closure)
            else:
                optimizer.step(closure=closure)
            counted = True
            start = progress.observe(index, objective.name, step, first[0])
            progress.keep_best(index, step, start["total"], partial(self._rendered, index, before))
            if safeguard is not None:
                best = progress.best_loss[index]
                progress.current[objective.name] = safeguard.after_step(
                    index, optimizer.optimizer, parameter, before, start, best
                )
            with torch.no_grad():
                self.parameterization.project_(parameter)  # pixels: projected gradient descent onto [0, 1]
                if safeguard is not None:
                    record_actual_step(optimizer.optimizer, parameter, before)
                if bool(torch.isfinite(parameter).all()):
                    progress.keep_good(index, self._rendered(index, parameter))
                # 16-mixed: the scaler skips a step with non-finite gradients and lowers its scale; not a stop.
                skipped = scaler is not None and scaler.get_scale() < scale
                if torch.equal(before, parameter) and not skipped:
                    progress.stop(index, objective.name, step)
        if self.coarse.average is not None:
            with torch.no_grad():
                self.coarse.update_average([self.decode(parameter) for parameter in self.images])
        if (not counted or progress.all_stopped) and self.coarse.due(step, progress.all_stopped) is None:
            self.trainer.should_stop = True  # unless a next scale follows: it starts at the next step
        total = sum(row["total"] for row in progress.current.values())
        self._log_terms(step, total)
        # The progress bar's; the loggers get it from _log_terms, since through self.log Lightning would add a flat
        # `epoch` curve (a fit is one epoch) to every step's scalars.
        self.log("loss", total, on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=1)

    def _rendered(self, index: int, parameter: Tensor) -> Tensor:
        return self.render(index, self.decode(parameter))[0]

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
        metrics = {**self.progress.curves(self.objectives), "loss": total}
        if self.safeguard is not None:
            rows = zip(self.objectives, self.trainer.optimizers, self.safeguard.rejected, strict=True)
            metrics.update({
                f"{objective.name}/rejected": float(count)
                for index, (objective, optimizer, count) in enumerate(rows)
                if self.safeguard.guards(index) and guarded(optimizer)
            })  # fmt: skip
        if self.coarse.schedule:
            metrics["scale"] = float(self.coarse.schedule[self.coarse.scale].long_edge)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    # -- results (lightning_nst.nst.results) ----------------------------------------------------------------------

    def check_finite(self, what: str) -> None:
        """Raise instead of letting a NaN or infinite image be saved (a PNG would show it as black).

        Args:
            what: What therefore did not happen, e.g. ``"no result was saved"``; the message says it.
        """
        check_finite(self.image, self.objectives, self.global_step, what)

    @torch.no_grad()
    def results(self) -> list[ObjectiveResult]:
        """Each objective's best image, its loss terms and metrics; raises if an image is not finite.

        The last step's image competes with the best ones seen during training (and becomes the best state when it
        wins): ``best_step``/``best_loss`` are those of the image returned, ``last_loss`` is the last image's
        (:meth:`~lightning_nst.nst.results.Progress.results`).
        """
        self.check_finite("no result was saved")
        image, averages = self.image, self.coarse.average
        average = None if averages is None else lambda i: self.render(i, averages[i].get().to(image.device))
        loss = self.objective_loss  # looked up now: a subclass or test may wrap it
        metrics = partial(self.evaluator.metrics, content=self.content, masked=self.masks is not None)
        return self.progress.results(
            self.objectives, image, self.trainer.global_step, loss, average, self.content, metrics
        )
