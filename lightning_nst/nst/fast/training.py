r"""Training the fast style networks as ordinary Lightning jobs: one LightningModule per paper.

- :class:`FastStyleTraining`: Johnson, Alahi and Fei-Fei (2016). A
  :class:`~lightning_nst.nst.fast.networks.TransformerNet` learns one style from crops of many photos: the content
  loss compares the VGG19 features of its output with the crop's, the style loss (any statistic of
  :class:`~lightning_nst.core.losses.LayerStyleLoss`; blends of several style images) compares them with the style
  image's, plus total variation.
- :class:`AdaINTraining`: Huang and Belongie (2017). The decoder of an
  :class:`~lightning_nst.nst.fast.networks.AdaINNet` learns to invert the AdaIN target
  :math:`t = \mathrm{AdaIN}(f(c), f(s))` for content and style crops: content loss
  :math:`\lVert f(g(t)) - t \rVert^2` at the encoder layer, style loss the mean and standard deviation losses over
  relu1_1 up to the encoder's block.

Both keep the trained network at ``self.network`` and write a
:class:`~lightning_nst.nst.fast.networks.FastNetworkRecord` into every checkpoint
(:data:`~lightning_nst.nst.fast.networks.RECORD_KEY`), which is all inference needs to rebuild it. Johnson's loss
VGG19 is not part of the module's state (see :class:`_LossNetwork`), so checkpoints hold the network's weights only;
AdaIN's encoder is part of the network and so of the checkpoint.

What Lightning does for any module works here as it is: DDP (every process computes its style targets itself, from
the same files and seed), ``bf16-mixed``/``16-mixed`` (the statistics and losses are float32, as in
:mod:`lightning_nst.core.losses`), checkpoints and exact resume (the data's position is the data module's state).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.optim import Adam, Optimizer
from torchvision.utils import make_grid

from lightning_nst.core.choices import STATISTICS
from lightning_nst.core.errors import NSTError
from lightning_nst.core.images import is_sample, load_image
from lightning_nst.core.layers import check_layers, layer_index
from lightning_nst.core.losses import LayerStyleLoss, Statistic, check_style_weights, mean_std, total_variation
from lightning_nst.core.vgg import VGG19Features, VGGConfig, check_weight, check_weights_cover
from lightning_nst.nst.fast.networks import RECORD_KEY, AdaINNet, FastNetworkRecord, TransformerNet, adain

__all__ = [
    "JOHNSON_CONTENT_LAYERS",
    "JOHNSON_STYLE_LAYERS",
    "STATE_KEY",
    "AdaINTraining",
    "FastStyleTraining",
    "adain_optimizer",
    "johnson_optimizer",
]

JOHNSON_CONTENT_LAYERS: tuple[str, ...] = ("relu2_2",)
"""Johnson et al.'s content layer."""
JOHNSON_STYLE_LAYERS: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
"""Johnson et al.'s style layers."""
STATE_KEY = "lightning_nst_training"
"""The checkpoint key of what a resumed run needs besides Lightning's own state (sliced_w's generators)."""


def johnson_optimizer(params: Any) -> Optimizer:
    """Adam with learning rate 1e-3, as Johnson et al."""
    return Adam(params, lr=1e-3)


def adain_optimizer(params: Any) -> Optimizer:
    """Adam with learning rate 1e-4, as Huang and Belongie."""
    return Adam(params, lr=1e-4)


def _mse(value: Tensor, target: Tensor) -> Tensor:
    """Mean squared error in float32 with autocast off, as :mod:`lightning_nst.core.losses` computes its losses."""
    with torch.autocast(value.device.type, enabled=False):
        return (value.float() - target.float()).square().mean()


def _vgg_config(vgg: VGGConfig | Mapping[str, Any] | None) -> VGGConfig:
    """The VGG options as given, or as a checkpoint's hyperparameters hold them (a plain mapping)."""
    if isinstance(vgg, Mapping):
        return VGGConfig(**vgg)
    return vgg or VGGConfig()


def _check_positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise NSTError(f"{key}: must be a whole number >= 0, got {value!r}")
    return int(value)


@dataclass
class _LossNetwork:
    """The frozen VGG19 of Johnson's losses and the style target, deliberately not an ``nn.Module`` attribute.

    Kept out of the module's registered children, it is not in ``state_dict`` (checkpoints hold the network alone),
    not broadcast or wrapped by DDP, not converted by a precision plugin and not counted as the model's parameters;
    :meth:`FastStyleTraining.loss_network` builds it (in ``configure_model``) and moves it to the module's device.
    """

    vgg: VGG19Features
    style: LayerStyleLoss | None = None


class _FastTraining(L.LightningModule):
    """What both trainings share: the optimizer from the config, images/s, the TensorBoard grid, the record."""

    network: Any

    def __init__(self, optimizer: OptimizerCallable, log_images_every_n_steps: int) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.log_images_every_n_steps = _check_positive_int(log_images_every_n_steps, "model.log_images_every_n_steps")
        self._tick: float | None = None
        self._preview: dict[str, Tensor] | None = None  # the validation items of the logged grid

    # -- subclasses -----------------------------------------------------------------------------------------------

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The loss terms and their weighted ``total`` of a batch."""
        raise NotImplementedError

    def record(self) -> FastNetworkRecord:
        """What a checkpoint keeps to rebuild :attr:`network`."""
        raise NotImplementedError

    def preview_images(self, batch: Mapping[str, Tensor]) -> list[Tensor]:
        """The columns of the logged grid for a batch of validation items, each ``(N, 3, H, W)`` in ``[0, 1]``."""
        raise NotImplementedError

    def trained_parameters(self) -> Any:
        """The parameters the optimizer moves."""
        return self.network.parameters()

    # -- Lightning hooks ------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> Optimizer:
        """The optimizer chosen in the config, over the trained parameters."""
        return self.optimizer_factory(self.trained_parameters())

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        """The losses of a batch of crops, logged as ``train/<term>``, and the throughput as ``train/images_per_s``."""
        terms = self.losses(batch)
        self._check_finite(terms)
        images = int(batch["content"].shape[0])
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "total", batch_size=images)
        now = time.perf_counter()
        if self._tick is not None and now > self._tick:
            rate = images * self.trainer.world_size / (now - self._tick) if self._trainer is not None else 0.0
            self.log("train/images_per_s", rate, prog_bar=True, on_step=True, on_epoch=False, batch_size=images)
        self._tick = now
        replaced = getattr(self._datamodule(), "replaced", None)
        if isinstance(replaced, int):
            self.log("data/replaced", float(replaced), on_step=True, on_epoch=False, batch_size=images)
        return terms["total"]

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        """The same losses on the held-out photos' centre crops, logged as ``val/<term>`` (mean over processes)."""
        terms = self.losses(batch)
        images = int(batch["content"].shape[0])
        for name, value in terms.items():
            self.log(f"val/{name}", value, prog_bar=name == "total", sync_dist=True, batch_size=images)
        if batch_idx == 0 and self._preview is None:
            self._preview = {key: value[:8].detach() for key, value in batch.items() if isinstance(value, Tensor)}

    def on_validation_end(self) -> None:  # noqa: D102
        self._tick = None  # the time between training steps, not across a validation

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Every ``log_images_every_n_steps`` steps, the validation images stylized side by side in TensorBoard."""
        every = self.log_images_every_n_steps
        if every and self.global_step % every == 0 and self.trainer.is_global_zero:
            self.log_preview()

    def log_preview(self) -> None:
        """Add the grid of the validation images (:meth:`preview_images`) to TensorBoard, on this process."""
        logger = self.logger
        if not isinstance(logger, TensorBoardLogger):
            return
        batch = self._preview_batch()
        if not batch:
            return
        # No mode switch: instance normalisation without running statistics computes the same in both modes.
        with torch.no_grad():
            columns = [column.detach().float().clamp(0, 1).cpu() for column in self.preview_images(batch)]
        tiles = torch.stack(columns, dim=1).flatten(0, 1)  # row by row: one validation item per row
        grid = make_grid(tiles, nrow=len(columns), padding=2, pad_value=1.0)
        logger.experiment.add_image("val/stylized", grid, self.global_step)
        self._tick = None

    def _preview_batch(self) -> dict[str, Tensor]:
        datamodule = self._datamodule()
        if self._preview is None and hasattr(datamodule, "preview"):
            self._preview = datamodule.preview()
        return {key: value.to(self.device) for key, value in (self._preview or {}).items()}

    def _datamodule(self) -> Any:
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    def _check_finite(self, terms: Mapping[str, Tensor]) -> None:
        """Stop every process, naming the term, once a loss is not finite on any of them (none is left waiting)."""
        bad = next((name for name, value in terms.items() if not torch.isfinite(value.detach()).all()), None)
        stop = bad is not None
        if self._trainer is not None:
            stop = self.trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            where = f"train/{bad} is {float(terms[bad])}" if bad else "a loss is not finite in another process"
            raise NSTError(
                f"step {self.global_step}: {where}; lower the learning rate (model.optimizer) or the loss weights"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write the network's record (:data:`RECORD_KEY`), which is all inference needs besides the weights."""
        checkpoint[RECORD_KEY] = self.record().to_dict()


def _style_name(source: str | os.PathLike[str]) -> str:
    return str(source) if is_sample(source) else Path(source).name


class FastStyleTraining(_FastTraining):
    r"""Train Johnson et al.'s feed-forward network for one style (or a blend of several).

    .. math::

        \mathcal{L} = w_c \sum_{l \in C} \tfrac{1}{|C|} \lVert \phi_l(T(x)) - \phi_l(x) \rVert^2
        + w_s \mathcal{L}_\text{style}(\phi(T(x)), s) + w_\text{tv} \mathrm{TV}(T(x))

    for a crop :math:`x`, the network :math:`T`, VGG19 features :math:`\phi_l` (means over values) and the
    :class:`~lightning_nst.core.losses.LayerStyleLoss` of the style image(s) :math:`s`, averaged over the batch.

    Note:
        The paper sums its squared Frobenius Gram distances over layers; here each layer's term is a mean
        (:class:`~lightning_nst.core.losses.StyleLoss`) and layers weigh ``1 / L``. pytorch/examples' weights (content
        1e5, style 1e10 on sums over four layers of normalised Grams) are content 1, style 4e5 here.

    Args:
        width: Channels of the network's first convolution (32 in the paper).
        residual_blocks: Residual blocks of the network (5 in the paper).
        style: The style image(s), a path or ``sample:NAME``; ``None`` takes ``data.style``.
        style_weights: Blend weights of several style images (normalised; ``None``: equal), see
            :class:`~lightning_nst.core.losses.StyleLoss` for each statistic's blend.
        style_size: Longer edge of the style image(s) in pixels; ``None``: the data's crop size (``data.size``).
        content_layers: VGG19 layers of the content loss (relu2_2 as the paper; relu3_1 is another common choice).
        style_layers: VGG19 layers of the style loss (the paper's relu1_2, relu2_2, relu3_3, relu4_3).
        statistic: The style statistic: ``gram``, ``meanvar``, ``w2`` or ``sliced_w``.
        content_weight: Weight of the content loss.
        style_weight: Weight of the style loss.
        tv_weight: Weight of the total variation.
        vgg: The loss network's weights (``auto``, ``imagenet``, ``random``, a file) and pooling; not stored in
            checkpoints, whose record names the weights used.
        optimizer: The optimizer, chosen in the config; Adam with learning rate 1e-3 by default.
        log_images_every_n_steps: Log the validation images stylized side by side every N steps (0: never).
    """

    def __init__(
        self,
        width: int = 32,
        residual_blocks: int = 5,
        # The union in ImageTargets.style's order: jsonargparse reuses a union's parser for an equal union, and
        # unions are equal in any order, so another order here made a later ImageTargets parse a list as a string.
        style: list[str | os.PathLike[str]] | str | os.PathLike[str] | None = None,
        style_weights: list[float] | None = None,
        style_size: int | None = None,
        content_layers: Sequence[str] = JOHNSON_CONTENT_LAYERS,
        style_layers: Sequence[str] = JOHNSON_STYLE_LAYERS,
        statistic: Statistic = "gram",
        content_weight: float = 1.0,
        style_weight: float = 4e5,
        tv_weight: float = 0.0,
        vgg: VGGConfig | None = None,
        optimizer: OptimizerCallable = johnson_optimizer,
        log_images_every_n_steps: int = 500,
    ) -> None:
        super().__init__(optimizer, log_images_every_n_steps)
        self.save_hyperparameters(ignore=["optimizer"])
        self.vgg_config = _vgg_config(vgg)
        sources = [style] if isinstance(style, str | os.PathLike) else list(style or [])
        self.style_sources: list[str] = [str(source) for source in sources]
        # Plain data only, so a checkpoint loads with weights_only=True (no dataclass, no Path).
        self.hparams.update(vgg=asdict(self.vgg_config), style=self.style_sources or None)
        self.content_layers = check_layers(list(content_layers), "model.content_layers")
        self.style_layers = check_layers(list(style_layers), "model.style_layers")
        if not self.content_layers and not self.style_layers:
            raise NSTError("model.style_layers: no content and no style layers; give at least one")
        if statistic not in STATISTICS:
            raise NSTError(f"model.statistic: must be one of {', '.join(STATISTICS)}, got {statistic!r}")
        weights = {"content": content_weight, "style": style_weight, "tv": tv_weight}
        for key, value in weights.items():
            check_weight(value, f"model.{key}_weight")
        if style_size is not None and (isinstance(style_size, bool) or style_size < 1):
            raise NSTError(f"model.style_size: must be a whole number >= 1, got {style_size!r}")
        self.statistic: Statistic = statistic
        self.weights = {key: float(value) for key, value in weights.items()}
        self.style_size = style_size
        check_weights_cover(self.vgg_config.weights, self.layers, self.vgg_config.fill_missing, "model.vgg")
        self.style_weights = style_weights
        if style_weights is not None and self.style_sources:
            check_style_weights(style_weights, len(self.style_sources), "model.style_weights")
        self.network = TransformerNet(width, residual_blocks)
        self.style_images: list[Tensor] = []
        self._style_key = "model.style"
        self._loss: _LossNetwork | None = None
        self._generator_states: dict[str, Tensor] | None = None

    @property
    def layers(self) -> list[str]:
        """Every VGG19 layer the losses read, in network order."""
        return sorted({*self.content_layers, *self.style_layers}, key=layer_index)

    # -- the style and the loss network -------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Load the style image(s): ``model.style``, else the data module's ``style``."""
        datamodule = self._datamodule()
        if not self.style_sources:
            self.style_sources = list(getattr(datamodule, "style", None) or [])
            self._style_key = "data.style"
        if self.style_size is None:
            self.style_size = getattr(datamodule, "size", None)
        self.load_style()

    def load_style(self) -> None:
        """Read the style images (once); raises naming the key if there is none or one cannot be read."""
        if self.style_images:
            return
        if not self.style_sources:
            raise NSTError("data.style: no style image; give data.style (or model.style) to train a Johnson network")
        if self.style_weights is not None:
            check_style_weights(self.style_weights, len(self.style_sources), "model.style_weights")
        single = len(self.style_sources) == 1
        self.style_images = [
            load_image(source, self.style_size, key=self._style_key if single else f"{self._style_key}[{i}]")
            for i, source in enumerate(self.style_sources)
        ]

    def configure_model(self) -> None:
        """Build the frozen loss VGG19 (once; see :class:`_LossNetwork` for why it is not a registered module)."""
        if self._loss is None:
            self._loss = _LossNetwork(self.vgg_config.build(self.layers, key="model.vgg"))

    def loss_network(self) -> _LossNetwork:
        """The loss VGG19 and style target on the module's device, built on first use."""
        self.configure_model()
        assert self._loss is not None
        loss = self._loss
        if loss.vgg.mean.device != self.device:
            loss.vgg.to(self.device)
            loss.style = None  # its targets are recomputed on the new device
        if loss.style is None and self.style_layers:
            self.load_style()
            with torch.no_grad():
                features = [loss.vgg(image.to(self.device), self.style_layers) for image in self.style_images]
            targets = {layer: [feature[layer] for feature in features] for layer in self.style_layers}
            loss.style = LayerStyleLoss(targets, self.statistic, weights=self.style_weights)
            self._restore_generators(loss.style)
        return loss

    def _restore_generators(self, style: LayerStyleLoss) -> None:
        if self._generator_states is None:
            return
        for layer, state in self._generator_states.items():
            generator = getattr(style.losses[layer], "generator", None)
            if generator is not None:
                generator.set_state(state)
        self._generator_states = None

    # -- losses -------------------------------------------------------------------------------------------------

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``content``, ``style``, ``tv`` and the weighted ``total`` of a batch of crops (batch means)."""
        loss = self.loss_network()
        content = batch["content"]
        output = self.network(content)
        features = loss.vgg(output)
        zero = output.new_zeros((), dtype=torch.float32)
        terms = {"content": zero, "style": zero, "tv": zero}
        if self.content_layers:
            with torch.no_grad():
                targets = loss.vgg(content, self.content_layers)
            terms["content"] = sum(
                (_mse(features[layer], targets[layer]) for layer in self.content_layers), zero
            ) / len(self.content_layers)
        if loss.style is not None:
            terms["style"] = loss.style({layer: features[layer] for layer in self.style_layers}).mean()
        if self.weights["tv"] > 0:
            terms["tv"] = total_variation(output).mean()
        terms["total"] = sum((self.weights[name] * terms[name] for name in ("content", "style", "tv")), zero)
        return terms

    def preview_images(self, batch: Mapping[str, Tensor]) -> list[Tensor]:
        """``input | stylized``."""
        return [batch["content"], self.network(batch["content"])]

    # -- checkpoints --------------------------------------------------------------------------------------------

    def record(self) -> FastNetworkRecord:
        """``johnson``, the network's width and blocks, the style file name(s) and the loss VGG's weights."""
        weights = self._loss.vgg.weights_used if self._loss is not None else str(self.vgg_config.weights)
        return FastNetworkRecord(
            kind="johnson",
            config={"width": self.network.width, "residual_blocks": self.network.residual_blocks},
            style=" + ".join(_style_name(source) for source in self.style_sources) or None,
            vgg_weights=weights,
            extra={
                "statistic": self.statistic,
                "content_layers": self.content_layers,
                "style_layers": self.style_layers,
                "style_size": self.style_size,
                "style_weights": self.style_weights,
                "weights": dict(self.weights),
            },
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The record, and the state of ``sliced_w``'s projection generators, so a resume draws what would follow."""
        super().on_save_checkpoint(checkpoint)
        style = self._loss.style if self._loss is not None else None
        generators = {
            layer: loss.generator.get_state()
            for layer, loss in (style.losses.items() if style is not None else [])
            if getattr(loss, "generator", None) is not None
        }
        checkpoint[STATE_KEY] = {"generators": generators}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the generators' states back (applied when the style target is built)."""
        state = checkpoint.get(STATE_KEY) or {}
        self._generator_states = dict(state.get("generators") or {}) or None
        if self._loss is not None and self._loss.style is not None:
            self._restore_generators(self._loss.style)


class AdaINTraining(_FastTraining):
    r"""Train the decoder of Huang and Belongie's AdaIN network: any style at inference.

    For content and style crops :math:`c, s`, the encoder :math:`f` (VGG19 up to ``encoder_layer``, frozen) and
    the decoder :math:`g`, with :math:`t = \mathrm{AdaIN}(f(c), f(s))`:

    .. math::

        \mathcal{L} = w_c \lVert f(g(t)) - t \rVert^2
        + w_s \sum_{l} \bigl( \lVert \mu(\phi_l(g(t))) - \mu(\phi_l(s)) \rVert^2
        + \lVert \sigma(\phi_l(g(t))) - \sigma(\phi_l(s)) \rVert^2 \bigr)

    over :func:`~lightning_nst.nst.fast.networks.adain_style_layers` (relu1_1 ... relu4_1 for the paper's
    encoder), with :func:`~lightning_nst.core.losses.mean_std`'s statistics, each norm a mean over values as in
    naoto0804/pytorch-AdaIN (the paper writes plain L2 norms). The decoder's output is not clamped here (clamping
    would stop the gradient of every pixel outside ``[0, 1]``); inference clamps it.

    Args:
        encoder_layer: The encoder's last layer: ``relu4_1`` as the paper; ``relu3_1`` works with the partial
            ImageNet weights file.
        vgg: The encoder's weights (``auto``, ``imagenet``, ``random``, a file) and ``fill_missing``; stored in
            the checkpoint with the decoder, so the checkpoint is self-contained.
        content_weight: Weight of the content loss.
        style_weight: Weight of the style loss (10 in the paper).
        optimizer: The optimizer of the decoder, chosen in the config; Adam with learning rate 1e-4 by default.
        log_images_every_n_steps: Log ``content | style | output`` of the validation items every N steps (0: never).
    """

    def __init__(
        self,
        encoder_layer: str = "relu4_1",
        vgg: VGGConfig | None = None,
        content_weight: float = 1.0,
        style_weight: float = 10.0,
        optimizer: OptimizerCallable = adain_optimizer,
        log_images_every_n_steps: int = 500,
    ) -> None:
        super().__init__(optimizer, log_images_every_n_steps)
        self.save_hyperparameters(ignore=["optimizer"])
        self.vgg_config = _vgg_config(vgg)
        self.hparams.update(vgg=asdict(self.vgg_config))  # plain data, for weights_only loading
        check_layers([encoder_layer], "model.encoder_layer")
        if not encoder_layer.startswith("relu"):
            raise NSTError(f"model.encoder_layer: must be a ReLU layer such as relu4_1, got {encoder_layer!r}")
        for key, value in (("content_weight", content_weight), ("style_weight", style_weight)):
            check_weight(value, f"model.{key}")
        if self.vgg_config.pooling != "max":
            raise NSTError("model.vgg.pooling: AdaIN's encoder is VGG19 with max pooling, as its decoder mirrors it")
        check_weights_cover(self.vgg_config.weights, [encoder_layer], self.vgg_config.fill_missing, "model.vgg")
        self.encoder_layer = encoder_layer
        self.weights = {"content": float(content_weight), "style": float(style_weight)}
        self.network: AdaINNet | None = None

    def configure_model(self) -> None:
        """Build the network (once): the encoder loads its VGG19 weights here, not in ``__init__``."""
        if self.network is None:
            self.network = AdaINNet(self.encoder_layer, self.vgg_config.weights, self.vgg_config.fill_missing)

    def trained_parameters(self) -> Any:
        """The decoder's parameters; the encoder stays frozen."""
        self.configure_model()
        assert self.network is not None
        return self.network.decoder.parameters()

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``content``, ``style`` and the weighted ``total`` of a batch of content and style crops."""
        self.configure_model()
        network = self.network
        assert network is not None
        layer = network.encoder_layer
        with torch.no_grad():
            content = network.encode(batch["content"])[layer]
            style = network.encode(batch["style"])
            style_stats = {name: mean_std(style[name]) for name in network.style_layers}
            target = adain(content.float(), style_stats[layer][:, 0], style_stats[layer][:, 1])
        output = network.decoder(target)
        features = network.encode(output)
        content_loss = _mse(features[layer], target)
        style_loss = content_loss.new_zeros(())
        for name in network.style_layers:
            stats = mean_std(features[name])  # (B, 2, C): the means, then the standard deviations
            target = style_stats[name]
            style_loss = style_loss + _mse(stats[:, 0], target[:, 0]) + _mse(stats[:, 1], target[:, 1])
        total = self.weights["content"] * content_loss + self.weights["style"] * style_loss
        return {"content": content_loss, "style": style_loss, "total": total}

    def preview_images(self, batch: Mapping[str, Tensor]) -> list[Tensor]:
        """``content | style | output``."""
        assert self.network is not None
        return [batch["content"], batch["style"], self.network(batch["content"], batch["style"])]

    def record(self) -> FastNetworkRecord:
        """``adain``, the encoder layer and the encoder's weights in words."""
        self.configure_model()
        assert self.network is not None
        return FastNetworkRecord(
            kind="adain",
            config={"encoder_layer": self.encoder_layer},
            vgg_weights=self.network.weights_used,
            extra={"weights": dict(self.weights), "style_layers": list(self.network.style_layers)},
        )
