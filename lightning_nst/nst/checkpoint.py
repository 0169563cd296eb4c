"""An image optimisation's checkpoint as a resume reads it: its digest, one-line load errors, optimizer overrides.

Lightning writes and restores the checkpoint; this module adds what a resume must be able to trust. The module's
``on_save_checkpoint`` seals each checkpoint with a SHA-256 of its content (:func:`seal`), and every load checks it
(:func:`load`, :func:`verify`), so a damaged or truncated file is refused in one line instead of resuming into a
different image. A resume applies the command line's optimizer settings to the restored optimizer state where that
state can take them (:func:`optimizer_overrides`, :func:`apply_optimizer_overrides`) and refuses the others.

The command line checks a checkpoint against its config before any heavy work (:func:`check_checkpoint`); the
module checks it again once its trunk is built (``ImageOptimization.on_load_checkpoint``), for the Python API and for
what only the built module knows (the weights ``auto`` resolved to).

The module's resume state is ``checkpoint["lightning_nst"]`` (:func:`save_resume_state`, :func:`read_resume_state`):
a plain mapping whose ``version`` (:data:`RESUME_VERSION`) says how to read it. A checkpoint of a newer version is
refused in one line; checkpoints saved before versions were recorded have none and are read as version 0, which this
version reads as it always did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import check_input_file, file_digest, source_digest
from lightning_nst.core.images import is_sample, load_image

DIGEST_KEY = "lightning_nst_sha256"
"""The checkpoint's key for the SHA-256 of its content (:func:`content_digest`)."""

RESUME_KEY = "lightning_nst"
"""The checkpoint's key for the module's resume state (best images, scales, inputs' digests, ...)."""

RESUME_VERSION = 1
"""The version of the resume state this code writes and the newest it reads.

Raise it when a change to the resume state would make older code resume wrongly; a checkpoint without a version
(saved before versions were recorded) is version 0.
"""

# Lightning rewrites these when it loads a checkpoint saved by another version (lightning.pytorch.utilities.migration).
_UNSEALED = frozenset({DIGEST_KEY, "pytorch-lightning_version", "legacy_pytorch-lightning_version"})


def _feed(digest: Any, value: Any) -> None:
    """Feed ``value`` to ``digest`` by type and content, so that equal checkpoints hash equal however they were built.

    Mappings are fed in key order (``repr``), dataclasses as the mapping of their fields, tensors as dtype, shape and
    bytes. A checkpoint read back with ``torch.load`` therefore hashes as the dictionary that was saved.
    """
    if isinstance(value, Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _feed(digest, {field.name: getattr(value, field.name) for field in dataclasses.fields(value)})
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, list | tuple):
        digest.update(b"[" if isinstance(value, list) else b"(")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    elif isinstance(value, str):
        digest.update(f"s{len(value)}:".encode() + value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, bytes):
        digest.update(f"b{len(value)}:".encode() + value)
    else:  # None, bool, int, float and other scalars; repr is exact for floats
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def content_digest(checkpoint: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's content: every key but the digest itself and Lightning's version keys."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in checkpoint.items() if key not in _UNSEALED})
    return digest.hexdigest()


def seal(checkpoint: dict[str, Any]) -> None:
    """Record the checkpoint's :func:`content_digest` in it; the last thing done before Lightning writes it."""
    checkpoint[DIGEST_KEY] = content_digest(checkpoint)


def verify(checkpoint: Mapping[str, Any], where: str) -> None:
    """Raise naming ``where`` if the checkpoint's content is not what was sealed; one without a digest passes.

    Checkpoints saved before digests were recorded have none and are read as they are.
    """
    recorded = checkpoint.get(DIGEST_KEY)
    if recorded is not None and recorded != content_digest(checkpoint):
        raise NSTError(
            f"{where} is damaged: its content does not match the SHA-256 it was saved with; resume from another "
            "checkpoint, or start a new run without --ckpt_path"
        )


def load(path: str | os.PathLike[str], key: str = "ckpt_path") -> dict[str, Any]:
    """Read a checkpoint file as Lightning will (``weights_only``) and :func:`verify` it; errors are one line.

    Raises:
        NSTError: Naming ``key`` and the file if it is missing, not a regular file, unreadable, not a checkpoint
            (including one damaged beyond reading, such as a truncated archive), or damaged (:func:`verify`).
    """
    path = check_input_file(path, key, "checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types, for files that are not (or no longer) checkpoints
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = reason if len(reason) <= 160 else reason[:160] + "..."
        raise NSTError(
            f"{key}: {path} is not a readable Lightning checkpoint (a different file, or one damaged or cut short: "
            f"{reason})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "loops" not in checkpoint:
        raise NSTError(f"{key}: {path} is not a Lightning checkpoint (no state_dict and loop state)")
    verify(checkpoint, f"{key}: {path}")
    return checkpoint


def check_version(state: Mapping[str, Any], where: str) -> None:
    """Refuse, naming ``where``, a resume state of a newer :data:`RESUME_VERSION` than this code reads."""
    version = state.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise NSTError(
            f"{where} has a resume state version {version!r}, not a whole number: it is not a checkpoint of "
            "lightning_nst.ImageOptimization"
        )
    if version > RESUME_VERSION:
        raise NSTError(
            f"{where} was saved by a newer lightning_nst (resume state version {version!r}, this version reads up to "
            f"{RESUME_VERSION}); resume it with that version of lightning_nst, or start a new run without --ckpt_path"
        )


def save_resume_state(checkpoint: dict[str, Any], state: dict[str, Any]) -> None:
    """Put the module's resume ``state`` into ``checkpoint`` with its version, drop the frozen VGG weights, seal.

    The weights come from the config and can be hundreds of MB. Lightning calls the module's
    ``on_save_checkpoint`` last, so the digest covers everything it writes.
    """
    weights = checkpoint["state_dict"]
    for key in [key for key in weights if key.startswith("vgg.")]:
        del weights[key]
    checkpoint[RESUME_KEY] = {"version": RESUME_VERSION, **state}
    seal(checkpoint)


def read_resume_state(checkpoint: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The module's resume state of a checkpoint :func:`verify`-ed and of a version this code reads."""
    verify(checkpoint, where)
    state = checkpoint.get(RESUME_KEY) or {}
    check_version(state, where)
    return state


def refuse_other_parameterization(state: Mapping[str, Any], parameterization: str, where: str) -> None:
    """Refuse a checkpoint made with another ``model.parameterization`` than this run's."""
    saved_name = state.get("parameterization", "pixels")  # checkpoints from before it was recorded: pixels
    if saved_name != parameterization:
        raise NSTError(
            f"{where} was made with model.parameterization {saved_name}, this run gives {parameterization}; a resumed "
            "run cannot change it (start a new run without --ckpt_path, or give the checkpoint's "
            "model.parameterization)"
        )


def refuse_other_image(
    checkpoint: Mapping[str, Any],
    parameters: Sequence[Tensor],
    image_size: Callable[[torch.Size], tuple[int, int]],
    weights_used: str | None,
    where: str,
) -> None:
    """Refuse a checkpoint whose image has another size, or that was made with other VGG weights, than this run's.

    Args:
        checkpoint: The checkpoint.
        parameters: This run's image parameters, one per objective (``images.<i>`` of the state dict).
        image_size: The ``(H, W)`` of the image a parameter of a shape decodes to.
        weights_used: The weights this run's trunk loaded, as ``VGG19Features.weights_used`` describes them.
        where: ``ckpt_path: <path>`` or ``checkpoint``, named in the message.
    """
    state = checkpoint.get(RESUME_KEY) or {}
    for index, parameter in enumerate(parameters):
        saved = checkpoint.get("state_dict", {}).get(f"images.{index}")
        if saved is not None and saved.shape != parameter.shape:
            (saved_h, saved_w), (h, w) = image_size(saved.shape), image_size(parameter.shape)
            raise NSTError(
                f"{where} holds a {saved_w}x{saved_h} image, this run's data makes {w}x{h}; a resumed run "
                "cannot change the image size (start a new run without --ckpt_path, or give the checkpoint's "
                "data.size)"
            )
    recorded = state.get("vgg_weights")  # None in checkpoints saved before it was recorded: those still load
    if recorded and weights_used and weights_identity(recorded) != weights_identity(weights_used):
        raise NSTError(
            f"{where} was made with VGG weights {recorded}, but this run's model.vgg.weights gives {weights_used}; a "
            "resumed run cannot change the weights (start a new run without --ckpt_path, or give the "
            "checkpoint's weights)"
        )


# -- optimizer settings on resume ---------------------------------------------------------------------------------

APPLIED_ON_RESUME = frozenset(
    {
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "momentum",
        "dampening",
        "nesterov",
        "maximize",
        "foreach",
        "decoupled_weight_decay",
        "max_iter",
        "max_eval",
        "tolerance_grad",
        "tolerance_change",
        "history_size",
        "line_search_fn",
    }
)
"""Optimizer settings a resume takes from the command line over the restored state: they steer the next steps only.

Any other setting whose value differs from the checkpoint's (``amsgrad``, whose extra moments the state lacks or
holds; ``capturable``, ``fused``, ``differentiable``; settings of other optimizers) is refused by name.
L-BFGS's ``history_size`` is applied by keeping the newest pairs of its history.
"""


def settings_of(factory: Any) -> tuple[str, dict[str, Any]]:
    """The class name and settings of the optimizer ``factory`` builds (its param group, ``params`` left out)."""
    optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
    return type(optimizer).__name__, {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def optimizer_overrides(saved_states: Sequence[Mapping[str, Any]], fresh: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``fresh`` (:func:`settings_of`) that differ from the saved optimizer states' groups.

    Returns:
        ``{setting: (saved value, new value)}``.
    """
    changed: dict[str, Any] = {}
    for state in saved_states:
        for group in state.get("param_groups", []):
            for name, value in fresh.items():
                if name in group and not _same(group[name], value):
                    changed.setdefault(name, (group[name], value))
    return changed


def refuse_optimizer_overrides(changed: Mapping[str, Any], where: str) -> None:
    """Raise, naming the first, if ``changed`` (:func:`optimizer_overrides`) holds a setting a resume cannot apply."""
    refused = [name for name in changed if name not in APPLIED_ON_RESUME]
    if refused:
        saved, new = changed[refused[0]]
        raise NSTError(
            f"{where} was saved with model.optimizer.init_args.{refused[0]} {saved!r}, this command gives {new!r}; "
            "the restored optimizer state cannot take that change (start a new run without --ckpt_path, or give the "
            "checkpoint's value)"
        )


def apply_optimizer_overrides(saved_states: Sequence[dict[str, Any]], changed: Mapping[str, Any]) -> None:
    """Write the new values of ``changed`` into the saved optimizer states, before Lightning restores them.

    An L-BFGS history longer than a new ``history_size`` keeps its newest pairs.
    """
    for state in saved_states:
        for group in state.get("param_groups", []):
            for name, (_, new) in changed.items():
                if name in group:
                    group[name] = new
            size = group.get("history_size")
            if "history_size" in changed and isinstance(size, int):
                for param_state in (state.get("state") or {}).values():
                    for key in ("old_dirs", "old_stps", "ro"):
                        if isinstance(param_state.get(key), list):
                            param_state[key] = param_state[key][-size:]
                    if "al" in param_state:
                        param_state["al"] = [None] * size


def describe_overrides(changed: Mapping[str, Any]) -> str:
    """``model.optimizer.init_args.lr 5.0 (the checkpoint's 1.0), ...`` for the resume's info line."""
    return ", ".join(
        f"model.optimizer.init_args.{name} {new!r} (the checkpoint's {old!r})" for name, (old, new) in changed.items()
    )


def take_optimizer_settings(checkpoint: dict[str, Any], factory: Any, saved_class: str | None, where: str) -> None:
    """Put this run's optimizer settings into the checkpoint's optimizer states, which Lightning restores next.

    Lightning would restore the saved ``param_groups`` whole, silently dropping a new ``lr``: the settings
    :data:`APPLIED_ON_RESUME` names are taken from this run (``factory``, ``model.optimizer``), the others must not
    differ, nor may the optimizer's class (``saved_class``, recorded in the resume state).
    """
    states = checkpoint.get("optimizer_states") or []
    if not states:
        return
    try:
        built, fresh = settings_of(factory)
    except (TypeError, ValueError):
        return  # the module's configure_optimizers names the bad setting
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


def weights_identity(description: str) -> tuple[str, ...]:
    """What identifies the weights a :attr:`~lightning_nst.core.vgg.VGG19Features.weights_used` description names.

    ``("imagenet",)``, ``("random", seed)`` or ``("file", sha256 prefix)``: the same weights chosen another way
    (``auto`` or by name, a file moved) are the same.
    """
    if description.startswith("random"):
        seed = re.search(r"seed (\d+)", description)
        return ("random", seed.group(1) if seed else "")
    if description.startswith("file"):
        digest = re.search(r"sha256 ([0-9a-f]+)", description)
        return ("file", digest.group(1) if digest else description)
    return (description.split(" ", 1)[0],)


# -- the early check of a resume, before any heavy work ---------------------------------------------------------


def _plain(value: Any) -> Any:
    """A config value as JSON-comparable plain data."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return json.loads(json.dumps(value, default=str))


UNSAFE_ON_RESUME = ("objectives", "vgg", "init", "init_seed", "parameterization", "scales", "scale_steps", "avg_decay")
"""ImageOptimization options a resumed run may not change: the checkpoint's image was made for them."""


def check_checkpoint(config: Namespace) -> dict[str, Any] | None:
    """Check ``ckpt_path`` before any heavy work; return its resume state if it is an image optimisation checkpoint.

    Refuses, naming ``ckpt_path``, a file that is not a checkpoint, one of another task, and one whose model options
    (:data:`UNSAFE_ON_RESUME`), optimizer class, data size or input images differ from this command's. Options that
    only steer the run (steps, logging, ``snapshot_every``, ``save_every``, outputs) are taken from the command line.
    """
    value = str(config.ckpt_path)
    if value in ("last", "best", "hpc", "registry") or value.startswith("registry:"):
        return None
    path = Path(value).expanduser()
    checkpoint = load(path)
    model = config.get("model")
    class_path = model.get("class_path", "") if isinstance(model, Namespace) else ""
    if not class_path.endswith("ImageOptimization"):
        return None
    state = checkpoint.get(RESUME_KEY)
    if isinstance(state, dict):
        check_version(state, f"ckpt_path: {path}")
    if "images.0" not in checkpoint["state_dict"] or not isinstance(state, dict):
        raise NSTError(f"ckpt_path: {path} is not a checkpoint of lightning_nst.ImageOptimization (no image state)")
    wanted = model.get("init_args") or Namespace()
    saved = checkpoint.get("hyper_parameters") or {}
    changed = [
        f"model.{key}" for key in UNSAFE_ON_RESUME if key in saved and _plain(wanted.get(key)) != _plain(saved[key])
    ]
    if "model.vgg" in changed and state.get("vgg_weights") and _same_but_weights(wanted.get("vgg"), saved["vgg"]):
        changed.remove("model.vgg")  # the weights themselves are compared below, whichever way they were named
    optimizer = wanted.get("optimizer")
    name = optimizer.get("class_path", "") if isinstance(optimizer, Namespace) else "Adam"
    if state.get("optimizer") and name.rsplit(".", 1)[-1] != state["optimizer"]:
        changed.append("model.optimizer")
    data_config = config.get("data") or Namespace()
    data = data_config.get("init_args") or Namespace()
    size = data.get("size")
    if state.get("size") and [size, data.get("style_size") or size] != list(state["size"]):
        changed.append("data.size")
    if changed and changed != ["data.size"]:
        raise NSTError(
            f"ckpt_path: {path} was saved with other {', '.join(changed)} than this command; a resumed run cannot "
            f"change them (start a new run without --ckpt_path, or give the checkpoint's values)"
        )
    _check_optimizer_settings(path, checkpoint.get("optimizer_states") or [], optimizer)
    _check_weights(path, state.get("vgg_weights"), wanted.get("vgg"))
    _check_inputs(path, state.get("inputs"), data, wanted.get("init"))
    if str(data_config.get("class_path", "")).endswith("ImageTargets"):
        # A coarse-to-fine checkpoint holds the image at its scale's size: compare the output size instead. Otherwise
        # the decoded image's shape: a laplacian parameter is wider than its image.
        plan = (state.get("scales") or {}).get("plan")
        if plan:
            shape = [plan[-1]["height"], plan[-1]["width"]]
        else:
            shape = state.get("image_shape") or checkpoint["state_dict"]["images.0"].shape
        _check_image_shape(path, shape, state.get("size"), data)
    if changed:  # the same image shape, but other style targets (style_size)
        raise NSTError(
            f"ckpt_path: {path} was saved with other data.size than this command; a resumed run cannot change it "
            f"(start a new run without --ckpt_path, or give the checkpoint's values)"
        )
    return state


def _check_optimizer_settings(path: Path, states: list[dict[str, Any]], optimizer: Any) -> None:
    """Refuse optimizer settings that differ from the checkpoint's and that a resume cannot apply (early)."""
    if not states or not isinstance(optimizer, Namespace) or not optimizer.get("class_path"):
        return  # the default optimizer, whose class the checkpoint's is compared with above
    module, _, name = str(optimizer.class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        init_args = _plain(optimizer.get("init_args")) or {}
        _, fresh = settings_of(lambda params: cls(params, **init_args))
    except Exception:  # a setting the optimizer rejects is named when the run builds it
        return
    refuse_optimizer_overrides(optimizer_overrides(states, fresh), f"ckpt_path: {path}")


def _same_but_weights(wanted: Any, saved: Any) -> bool:
    """Whether two ``model.vgg`` configs differ at most in how they name the weights."""
    wanted, saved = _plain(wanted) or {}, _plain(saved) or {}
    if not isinstance(wanted, dict) or not isinstance(saved, dict):
        return False
    fields = set(wanted) | set(saved)
    return all(wanted.get(field) == saved.get(field) for field in fields - {"weights"})


def _styles(data: Namespace) -> list[Any]:
    """``data.style`` as a list: one image may be given as a plain string, as ImageTargets accepts it."""
    style = data.get("style")
    return [style] if isinstance(style, str | os.PathLike) else list(style or [])


def _check_image_shape(path: Path, saved: Sequence[int], sizes: Sequence[int | None] | None, data: Namespace) -> None:
    """Refuse when this command's data makes an image of another shape than the checkpoint's.

    The shape follows from the reference image (content, else the first style image) and its size, loaded here as
    ImageTargets will load it; a shape mismatch would otherwise surface as a traceback when Lightning restores the
    image parameters. Also covers checkpoints that do not record ``data.size``.
    """
    style = _styles(data)
    size = data.get("size")
    if data.get("content") is not None:
        height, width = load_image(data.content, size, key="data.content").shape[-2:]
    elif style:
        height, width = load_image(style[0], data.get("style_size") or size, key="data.style[0]").shape[-2:]
    else:
        return  # the data module names what is missing
    if (height, width) != tuple(saved[-2:]):
        made_with = f" (data.size {sizes[0]})" if sizes else ""
        raise NSTError(
            f"ckpt_path: {path} holds a {saved[-1]}x{saved[-2]} image{made_with}, this command's data makes "
            f"{width}x{height} (data.size {size}); a resumed run cannot change the image size (start a new run "
            "without --ckpt_path, or give the checkpoint's data.size)"
        )


def _check_weights(path: Path, recorded: str | None, vgg: Any) -> None:
    """Refuse when this command's ``model.vgg.weights`` names other weights than the checkpoint's were.

    Checkpoints saved before the weights were recorded hold no record and are not checked. ``auto`` is left to
    :meth:`ImageOptimization.on_load_checkpoint`, which knows what it resolved to once the trunk is built; a named
    file is compared here by its content digest, without loading it.
    """
    if not recorded or vgg is None:
        return
    choice = str(vgg.get("weights", "auto"))
    if choice == "random":
        wanted = f"random (seed {vgg.get('seed', 0)})"
    elif choice == "imagenet":
        wanted = "imagenet"
    elif choice != "auto" and Path(choice).expanduser().is_file():
        file = Path(choice).expanduser()
        wanted = f"file {file.resolve()} (sha256 {file_digest(file)[:12]})"
    else:
        return  # auto, or a missing file, which the trunk names with its own key
    if weights_identity(recorded) != weights_identity(wanted):
        raise NSTError(
            f"ckpt_path: {path} was made with VGG weights {recorded}, but this command's model.vgg.weights gives "
            f"{wanted}; a resumed run cannot change the weights (start a new run without --ckpt_path, or give the "
            "checkpoint's weights)"
        )


def _check_inputs(path: Path, saved: dict[str, Any] | None, data: Namespace, init: str | None) -> None:
    """Refuse when the input images (content, style, masks, init) or blend weights differ from the checkpoint's."""
    if not saved:
        return
    sources: dict[str, Any] = {"data.content": data.get("content")}
    styles = _styles(data)
    sources.update({f"data.style[{i}]": source for i, source in enumerate(styles)})
    if init not in (None, "noise", "content"):
        sources["model.init"] = init
    recorded: dict[str, Any] = {"data.content": saved.get("data.content"), "model.init": saved.get("model.init")}
    recorded.update({f"data.style[{i}]": digest for i, digest in enumerate(saved.get("data.style") or [])})
    if len(saved.get("data.style") or []) != len(styles):
        raise NSTError(
            f"data.style: the checkpoint {path} was made from {len(saved.get('data.style') or [])} "
            f"style images, this command gives {len(styles)}; start a new run"
        )
    weights = data.get("style_weights")
    if (None if weights is None else [float(w) for w in weights]) != saved.get("data.style_weights"):
        raise NSTError(f"data.style_weights: differs from the checkpoint {path}; start a new run without --ckpt_path")
    for key in ("data.masks", "data.style_masks"):
        given = data.get(key.removeprefix("data."))
        if (given is None) != (saved.get(key) is None) or len(given or []) != len(saved.get(key) or []):
            raise NSTError(f"{key}: differs from the checkpoint {path}; start a new run without --ckpt_path")
        sources.update({f"{key}[{i}]": source for i, source in enumerate(given or [])})
        recorded.update({f"{key}[{i}]": digest for i, digest in enumerate(saved.get(key) or [])})
    for key, source in sources.items():
        if (source is None) != (recorded.get(key) is None):
            raise NSTError(f"{key}: differs from the checkpoint {path}; start a new run without --ckpt_path")
        if source is None or (not is_sample(source) and not Path(source).expanduser().is_file()):
            continue  # a missing file is reported by the data module with its own key
        if source_digest(source) != recorded[key]:
            raise NSTError(
                f"{key}: {source} changed since the checkpoint {path} was saved (the target changed under the "
                f"checkpoint); start a new run without --ckpt_path, or restore the file"
            )
