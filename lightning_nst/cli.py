"""``lightning-nst``: LightningCLI entry point for image optimisation (``fit``) and guided diffusion (``predict``)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import ArgsType, LightningCLI

from lightning_nst import preflight
from lightning_nst.errors import NSTError
from lightning_nst.outputs import check_input_file
from lightning_nst.vgg import LAYER_NAMES

DEBUG_ENV = "LIGHTNING_NST_DEBUG"
"""Set to 1 (or pass ``--debug``) to get full tracebacks instead of one-line errors."""

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "lightning_nst", "default_hp_metric": False},
    },
    "max_steps": 500,
    "max_epochs": 1,  # ImageTargets yields max_steps items per epoch
    "log_every_n_steps": 1,
    "enable_model_summary": False,
}

DESCRIPTION = """\
Neural style with PyTorch Lightning: feature inversion, texture synthesis, Gatys style transfer (`fit`) and
VGG-style-guided Stable Diffusion (`predict`). Run `lightning-nst layers` to list the VGG19 layer names and
`lightning-nst report --help` for the study's experiments as reports.
"""


# The frozen VGG trunk is in eval mode on purpose (it has no dropout or batch norm, so the mode changes nothing).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class NSTCLI(LightningCLI):
    """LightningCLI with the project's trainer defaults; the model and data classes come from the config."""

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs["parser_kwargs"] = {"description": DESCRIPTION, **kwargs.get("parser_kwargs", {})}
        super().__init__(auto_configure_optimizers=False, seed_everything_default=0, args=args, run=run, **kwargs)

    def before_instantiate_classes(self) -> None:
        """Turn ``inference_mode`` off for ``predict`` and load checkpoints with ``weights_only=True`` by default.

        Guided sampling needs gradients, which ``inference_mode`` would forbid. ``--weights_only`` left unset would
        defer to torch's default, which has changed between releases; ``--weights_only false`` still loads a trusted
        checkpoint that holds arbitrary objects.
        """
        config = self.config[self.subcommand]
        if self.subcommand == "predict":
            config.trainer.inference_mode = False
        if "weights_only" in config and config.weights_only is None:
            config.weights_only = True
        preflight.check(config, self.subcommand)

    def _run_subcommand(self, subcommand: str) -> None:
        # The logger creates its run folder before any setup hook; a run that fails on bad input must not leave
        # that folder behind looking like a result. Folders holding anything else (a kept image) stay.
        log_dir = Path(self.trainer.log_dir) if self.trainer.log_dir else None
        existed = log_dir is not None and log_dir.exists()
        try:
            super()._run_subcommand(subcommand)
        except NSTError:
            if log_dir is not None and not existed and self.trainer.is_global_zero and _only_bookkeeping(log_dir):
                shutil.rmtree(log_dir, ignore_errors=True)
            raise


def _only_bookkeeping(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but the config, hyperparameters and TensorBoard events of a run."""
    for path in folder.rglob("*"):
        if path.is_file() and path.name not in ("config.yaml", "hparams.yaml"):
            if not path.name.startswith("events.out.tfevents."):
                return False
    return True


def print_layers() -> None:
    """Print every VGG19 feature module with its index, channels and stride."""
    from torchvision.models.vgg import cfgs

    print(f"{'index':>5}  {'name':<8} {'channels':>8} {'stride':>6}")
    widths = [entry for entry in cfgs["E"] if entry != "M"]
    channels, stride, conv = 3, 1, 0
    for index, name in enumerate(LAYER_NAMES):
        if name.startswith("conv"):
            channels, conv = widths[conv], conv + 1
        elif name.startswith("pool"):
            stride *= 2
        print(f"{index:>5}  {name:<8} {channels:>8} {stride:>6}")


_KEY = re.compile(r'Parser key "([^"]+)":\s*(.*)')
_CLASS = re.compile(r"Problem with given class_path '([^']+)':")
_OPTION = re.compile(r"Option '([^']+)' is not accepted")
# Alternatives jsonargparse reports for every Optional/Union/path-like type, which say nothing about the mistake.
_NOISE = ("Expected a <class 'NoneType'>", "Expected a path but", "Expected a dot import path string")
_STRUCTURE = ("Does not validate against any of the", "Subtypes:", "Errors:", "Given value type:")


def condense(message: str) -> str:
    """Reduce a nested jsonargparse error to ``key.path: problem (got value)`` on one line."""
    keys: list[tuple[int, str]] = []
    cls = ""
    found: tuple[str, str] | None = None
    given = ""
    for line in message.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" -"))
        text = line.strip().lstrip("- ").strip()
        keys = [(level, key) for level, key in keys if level < indent]
        if match := _CLASS.search(text):
            cls = match.group(1)
            continue
        if match := _KEY.search(text):
            keys.append((indent, match.group(1)))
            text = match.group(2)
        if text.startswith("Given value:") and found is not None and not given:
            value = text.removeprefix("Given value:").split(". Got value:")[0].strip()
            given = "" if value.startswith(("NestedArg(", "Namespace(")) else value
            continue
        if not text or text.startswith(_STRUCTURE + _NOISE + ("Given value",)):
            continue
        path = ".".join(key for _, key in keys)
        if found is None or len(path) > len(found[0]):
            found, given = (path, text), ""
    if found is None:
        return " ".join(line.strip() for line in message.splitlines() if line.strip())
    path, text = found
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text.split(". Got value:")[0])
    text = re.sub(r"^Expected an? ", "expected ", text)
    if match := _OPTION.search(text):
        path, text = f"{path}.{match.group(1)}".lstrip("."), f"unknown option{f' of {cls}' if cls else ''}"
    suffix = f" (got {given})" if given and given not in text else ""
    return f"{path}: {text}{suffix}" if path else f"{text}{suffix}"


MAX_YAML_VALUES = 100_000
"""Most values a YAML config may expand to once its aliases are resolved; real configs hold a few hundred."""


def _yaml_problem(node: yaml.Node) -> str | None:
    """Why a composed YAML document is unfit for a config (a duplicate key, an alias bomb, a cycle), or ``None``.

    Aliases compose as shared nodes, so this walk is linear in the file size; it counts each value as often as the
    expanded document (which jsonargparse builds and copies) would hold it.
    """
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    open_nodes: set[int] = set()
    while stack:
        current, children_done = stack.pop()
        if id(current) in sizes:
            continue
        if isinstance(current, yaml.ScalarNode):
            sizes[id(current)] = 1
            continue
        pairs = current.value if isinstance(current, yaml.MappingNode) else [(item,) for item in current.value]
        children = [child for pair in pairs for child in pair]
        if children_done:
            open_nodes.discard(id(current))
            sizes[id(current)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(current)] > MAX_YAML_VALUES:
                return f"its aliases expand to over {MAX_YAML_VALUES} values"
            continue
        if id(current) in open_nodes:
            return f"the alias at line {current.start_mark.line + 1} refers to a value that contains it"
        if isinstance(current, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, _ in current.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in seen:
                        return (
                            f"duplicate key '{key.value}' at line {key.start_mark.line + 1} (first at line "
                            f"{seen[key.value]}); YAML would silently keep only the last"
                        )
                    seen[key.value] = key.start_mark.line + 1
        open_nodes.add(id(current))
        stack.append((current, True))
        for child in children:
            if id(child) in open_nodes:
                return f"the alias at line {child.start_mark.line + 1} refers to a value that contains it"
            if id(child) not in sizes:
                stack.append((child, False))
    return None


def _check_yaml_text(text: str, what: str) -> None:
    """Raise naming ``what`` if ``text`` is not YAML, has duplicate keys, or expands out of proportion."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        problem = _yaml_problem(node) if node is not None else None
        if problem is None:
            yaml.safe_load(text)
    except RecursionError:
        problem = "it is nested too deeply"
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise NSTError(f"{what} is not valid YAML{where}: {reason}") from None
    if problem is not None:
        raise NSTError(f"{what} is refused: {problem}")


def _flag_values(argv: list[str]) -> list[tuple[str, str]]:
    """``(flag, value)`` of each command-line value, for ``--flag value`` and ``--flag=value`` alike."""
    pairs: list[tuple[str, str]] = []
    for index, arg in enumerate(argv):
        if arg.startswith("--") and "=" in arg:
            pairs.append(tuple(arg.split("=", 1)))  # type: ignore[arg-type]
        elif not arg.startswith("-") and index and argv[index - 1].startswith("-") and "=" not in argv[index - 1]:
            pairs.append((argv[index - 1], arg))
    return pairs


def _check_yaml_files(argv: list[str]) -> None:
    """Check all YAML that jsonargparse would read, before it reads any, naming the file, line and column.

    That is ``--config`` files, other ``.yaml``/``.yml`` files given as values (jsonargparse loads those as well),
    and inline values that use aliases.
    """
    for flag, value in _flag_values(argv):
        key = "--config" if flag in ("-c", "--config") else flag
        path = Path(value)
        is_config = key == "--config" and not value.lstrip().startswith(("{", "["))
        if is_config or (path.suffix.lower() in (".yaml", ".yml") and path.is_file()):
            if not path.is_file():
                check_input_file(path, key, "file")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise NSTError(f"{key}: {path} is not UTF-8 text") from None
            _check_yaml_text(text, f"{key}: {path}")
        elif "*" in value and "&" in value:  # jsonargparse parses inline values as YAML too
            try:
                node = yaml.compose(value, Loader=yaml.SafeLoader)
            except (yaml.YAMLError, RecursionError):
                continue  # not YAML with aliases; jsonargparse reports what it makes of it
            if node is not None and (problem := _yaml_problem(node)):
                raise NSTError(f"{key}: the value is refused: {problem}")


def main(args: ArgsType = None) -> None:
    """Run the CLI: ``lightning-nst {fit,predict,report,layers} ...``. Bad input exits with status 2 and one line."""
    debug = os.environ.get(DEBUG_ENV) == "1"
    if args is None:
        # LightningCLI reads sys.argv itself (and warns when given it as args), so strip our flag there.
        debug = debug or "--debug" in sys.argv
        sys.argv = [arg for arg in sys.argv if arg != "--debug"]
        listed = sys.argv[1:]
    elif isinstance(args, list):
        debug = debug or "--debug" in args
        args = listed = [arg for arg in args if arg != "--debug"]
    else:
        listed = []
    if listed[:1] == ["layers"]:
        print_layers()
        return
    NSTError.raised.clear()
    try:
        _check_yaml_files(listed)
        if listed[:1] == ["report"]:
            from lightning_nst.report import main as report

            report(listed[1:])
        else:
            NSTCLI(args=args, parser_kwargs={"exit_on_error": False})
    except (NSTError, ArgumentError, ValueError, MisconfigurationException) as error:
        if debug:
            raise
        if isinstance(error, NSTError):
            message = str(error)
        elif cause := NSTError.behind(error):
            message = str(cause)
        elif isinstance(error, MisconfigurationException):  # Lightning's own check of a trainer option
            message = "trainer: " + " ".join(str(error).split())
        elif isinstance(error, ArgumentError) or "Problem with given class_path" in str(error):
            command = listed[0] if listed and listed[0] in ("fit", "validate", "test", "predict", "report") else ""
            message = f"{condense(str(error))} (see `lightning-nst {command} --help`)".replace("  ", " ")
        else:
            raise
        if os.environ.get("LOCAL_RANK", "0") == "0":  # under DDP every process fails alike: say it once
            print(f"lightning-nst: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
