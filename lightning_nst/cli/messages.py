"""One-line messages for bad input: jsonargparse's and Lightning's errors made ``key.path: problem (got value)``.

:func:`nst_error` turns an error the CLI raised into the :class:`~lightning_nst.core.errors.NSTError` that
``lightning-nst`` prints as ``lightning-nst: error: ...``; :func:`condense` reduces jsonargparse's nested report to its
deepest key. Importing this module imports neither torch nor Lightning, so ``lightning-nst``'s own errors stay fast.
"""

from __future__ import annotations

import re
import sys
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path

from lightning_nst.core.errors import NSTError, lost_peer

# LightningCLI's SaveConfigCallback refuses to replace the config.yaml of an earlier run with this RuntimeError.
_CONFIG_EXISTS = re.compile(r"SaveConfigCallback expected (.+) to NOT exist")
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
            # Not a whole class's or config's value (an inline config), only a value a user types
            given = "" if value.startswith(("NestedArg(", "Namespace(", "{")) or len(value) > 80 else value
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
    text = _plain_words(text)
    suffix = f" (got {given})" if given and given not in text else ""
    return f"{path}: {text}{suffix}" if path else f"{text}{suffix}"


_RESTRICTED = re.compile(r"^Not of type (\w+): (.*)$")
_RESTRICTIONS = {"PositiveInt": "an integer > 0", "NonNegativeInt": "an integer >= 0"}
_LITERAL = re.compile(r"^expected typing\.Literal\[(.*)\]$")


def _plain_words(text: str) -> str:
    """The rule a restricted or ``Literal`` type states, in plain words and with the value given, if jsonargparse's."""
    if match := _RESTRICTED.match(text):
        kind, detail = match.groups()
        rule = f"must be {_RESTRICTIONS.get(kind, kind)}"
        if got := re.match(r"^(\S+) does not conform", detail):
            return f"{rule} (got {got.group(1)})"
        if got := re.search(r"invalid literal for int\(\) with base 10: (.+)$", detail):
            return f"{rule} (got {got.group(1)})"
        return rule
    if match := _LITERAL.match(text):
        return "must be one of " + ", ".join(choice.strip().strip("'\"") for choice in match.group(1).split(","))
    return text


COMMANDS = ("fit", "validate", "test", "predict", "report")


def nst_error(error: BaseException, args: Sequence[str]) -> NSTError | None:
    """The one-line NSTError that stands for ``error`` raised by the CLI on ``args``, or ``None`` for a bug.

    That is an NSTError itself or one jsonargparse wrapped, Lightning's refusal of a trainer option, LightningCLI's
    refusal to overwrite an earlier run's config, and jsonargparse's own errors, condensed to the key and problem.
    """
    if found := NSTError.behind(error):
        return found
    if isinstance(error, _lightning_errors()):  # Lightning's own check of a trainer option
        return NSTError("trainer: " + " ".join(str(error).split()))
    if (lost := lost_peer(error)) is not None:
        return NSTError(
            f"trainer: another process of this run ended before it ({lost}); see that process's output for why, then "
            "run the same command again on every node"
        )
    if isinstance(error, RuntimeError):
        if not (match := _CONFIG_EXISTS.search(str(error))):
            return None
        return NSTError(
            f"trainer.default_root_dir: {match.group(1)} exists, so a run already wrote into "
            f"{Path(match.group(1)).parent}; choose another folder, or keep a logger, which makes a new "
            "version folder for every run"
        )
    if isinstance(error, ArgumentError) or (
        isinstance(error, ValueError) and "Problem with given class_path" in str(error)
    ):
        command = args[0] if args and args[0] in COMMANDS else ""
        return NSTError(f"{condense(str(error))} (see `lightning-nst {command} --help`)".replace("  ", " "))
    return None


def _lightning_errors() -> tuple[type[Exception], ...]:
    """Lightning's ``MisconfigurationException`` once Lightning is imported; before, nothing can have raised it."""
    module = sys.modules.get("lightning.fabric.utilities.exceptions")
    return (module.MisconfigurationException,) if module is not None else ()


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types :func:`nst_error` may turn into a one-line message (an ``except`` clause's tuple)."""
    return (NSTError, ArgumentError, ValueError, RuntimeError, *_lightning_errors())
