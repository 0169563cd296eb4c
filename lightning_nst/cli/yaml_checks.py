"""Checks of the YAML a command gives jsonargparse, made before it reads any: one line naming file, line and column.

jsonargparse loads YAML with PyYAML, which keeps the last of two equal keys silently and expands aliases without
limit; these checks refuse both (and cyclic aliases) before any of it is parsed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import check_input_file

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


def _check_yaml_text(text: str, what: str, config: bool = False) -> None:
    """Raise naming ``what`` if ``text`` is not YAML, has duplicate keys, or expands out of proportion.

    A ``config`` (a ``--config`` file) must moreover be a mapping of options.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        problem = _yaml_problem(node) if node is not None else None
        if problem is None:
            document = yaml.safe_load(text)
            if config and document is None:
                problem = "it holds no options (an empty config)"
            elif config and not isinstance(document, dict):
                problem = f"it holds a {type(document).__name__}, not a mapping of options such as `trainer: ...`"
    except RecursionError:
        problem = "it is nested too deeply"
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise NSTError(f"{what} is not valid YAML{where}: {reason}") from None
    if problem is not None:
        raise NSTError(f"{what} is refused: {problem}")


MAX_TEXT_BYTES = 16 * 2**20
"""Largest file checked as YAML text when a value names it; a config or a bomb is far smaller."""


def _is_file(path: Path) -> bool:
    """``path.is_file()``, false for a value no file could have (too long a name) rather than an error."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _text(path: Path) -> str | None:
    """The file's text if it is UTF-8 text of at most :data:`MAX_TEXT_BYTES`, else ``None``."""
    try:
        if path.stat().st_size > MAX_TEXT_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _flag_values(argv: Sequence[str]) -> list[tuple[str, str]]:
    """``(flag, value)`` of each command-line value, for ``--flag value`` and ``--flag=value`` alike."""
    pairs: list[tuple[str, str]] = []
    for index, arg in enumerate(argv):
        if arg.startswith("--") and "=" in arg:
            pairs.append(tuple(arg.split("=", 1)))  # type: ignore[arg-type]
        elif not arg.startswith("-") and index and argv[index - 1].startswith("-") and "=" not in argv[index - 1]:
            pairs.append((argv[index - 1], arg))
    return pairs


def check_yaml_files(argv: Sequence[str]) -> None:
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
            _check_yaml_text(text, f"{key}: {path}", config=key == "--config")
        elif key != "--config" and _is_file(path):
            # jsonargparse reads the file a class or mapping option names as YAML, whatever its suffix: a file of
            # text that uses aliases is checked for what they expand to. Images and other binary files are not text.
            text = _text(path)
            if text is not None and "*" in text and "&" in text:
                try:
                    node = yaml.compose(text, Loader=yaml.SafeLoader)
                except (yaml.YAMLError, RecursionError):
                    continue  # not YAML; jsonargparse reports what it makes of it
                if node is not None and (problem := _yaml_problem(node)):
                    raise NSTError(f"{key}: {path} is refused: {problem}")
        elif "*" in value and "&" in value:  # jsonargparse parses inline values as YAML too
            try:
                node = yaml.compose(value, Loader=yaml.SafeLoader)
            except (yaml.YAMLError, RecursionError):
                continue  # not YAML with aliases; jsonargparse reports what it makes of it
            if node is not None and (problem := _yaml_problem(node)):
                raise NSTError(f"{key}: the value is refused: {problem}")


_SUBCOMMAND_OF_MODEL = {
    "ImageOptimization": "fit",
    "FastStyleTraining": "fit",
    "AdaINTraining": "fit",
    "GuidedDiffusion": "predict",
}


def check_subcommand_of_configs(args: Sequence[str]) -> None:
    """Refuse a config of the other subcommand (``predict -c texture_gram``) by name, before jsonargparse parses it."""
    subcommand = args[0] if args else None
    for index, arg in enumerate(args[:-1]):
        if arg not in ("-c", "--config") or args[index + 1].lstrip().startswith(("{", "[")):
            continue
        try:
            config = yaml.safe_load(Path(args[index + 1]).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # check_yaml_files has named what is wrong with it
        model = config.get("model") if isinstance(config, dict) else None
        class_path = str(model.get("class_path", "")) if isinstance(model, dict) else ""
        wanted = _SUBCOMMAND_OF_MODEL.get(class_path.rsplit(".", 1)[-1])
        if wanted is not None and subcommand in ("fit", "predict") and wanted != subcommand:
            raise NSTError(
                f"--config: {args[index + 1]} configures {class_path.rsplit('.', 1)[-1]}, which runs with "
                f"`lightning-nst {wanted}`, not {subcommand}"
            )
