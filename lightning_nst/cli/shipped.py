"""The configs shipped with the package: where they are, their names, and ``-c NAME`` resolved to a file.

The repository's top-level ``configs/`` is the one copy: a wheel carries it as the package data
``lightning_nst/configs/*.yaml`` (see ``pyproject.toml``), and a source checkout reads it where it is.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path, PurePath

from lightning_nst.core.errors import NSTError

SUFFIX = ".yaml"


def configs_dir() -> Path:
    """The folder of the shipped configs: the checkout's ``configs/`` if running from one, else the package data."""
    package = Path(__file__).resolve().parents[1]
    checkout = package.parent / "configs"
    if (package.parent / "pyproject.toml").is_file() and checkout.is_dir():
        return checkout
    return Path(str(resources.files("lightning_nst").joinpath("configs")))


def names() -> list[str]:
    """The shipped configs' names (file names without ``.yaml``), sorted."""
    folder = configs_dir()
    return sorted(path.stem for path in folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []


def path(name: str) -> Path:
    """The file of the shipped config ``name`` (it may not exist)."""
    return configs_dir() / f"{name.removesuffix(SUFFIX)}{SUFFIX}"


def first_comment(name: str) -> str:
    """The first comment line of a shipped config, without the ``#``."""
    for line in path(name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def resolve(value: str, key: str = "--config") -> str:
    """A ``--config`` value as a file: an existing path as given, else a shipped config's name (``.yaml`` optional).

    Inline YAML (``{...}``) is returned as it is.

    Raises:
        NSTError: If ``value`` is neither a file nor a shipped config's name: naming the shipped config a missing
            path such as ``configs/NAME.yaml`` ends in, else listing the names.
    """
    if value.lstrip().startswith(("{", "[")) or Path(value).expanduser().exists():
        return value
    name = value.removesuffix(SUFFIX)
    if "/" not in value and "\\" not in value and path(name).is_file():
        return str(path(name))
    # A path ending in a shipped name, `configs/NAME.yaml` as a checkout has it, typed where there is none (after
    # `pip install .`): the shipped config is most likely meant, but another file may be, so it is named, not run.
    stem = PurePath(value.replace("\\", "/")).name.removesuffix(SUFFIX)
    if stem and path(stem).is_file():
        raise NSTError(f"{key}: file not found: {value}; did you mean -c {stem}, the shipped config of that name?")
    raise NSTError(f"{key}: file not found: {value}, and no shipped config has that name ({', '.join(names())})")


def resolve_argv(argv: list[str]) -> list[str]:
    """``argv`` with every ``-c``/``--config`` value :func:`resolve`-d."""
    resolved = list(argv)
    for index, arg in enumerate(resolved):
        if arg in ("-c", "--config") and index + 1 < len(resolved):
            resolved[index + 1] = resolve(resolved[index + 1])
        elif arg.startswith("--config="):
            resolved[index] = "--config=" + resolve(arg.split("=", 1)[1])
    return resolved
