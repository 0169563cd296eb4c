"""``lightning-nst report <experiment>``: the study's experiments as folders of captioned figures and report.md.

An ordinary client of the library: each run is a shipped config plus the report's settings (:mod:`.configs`), made
through :func:`~lightning_nst.cli.lightning.run` by a :class:`Report` folder (:mod:`.folder`); :mod:`.experiments`
holds the experiments, one module each.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import fields
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_nst.core.errors import NSTError, StoppedBySignal
from lightning_nst.core.files import write_atomic
from lightning_nst.report.experiments import EXPERIMENTS, run
from lightning_nst.report.folder import Report, report_features, weights_stated_once
from lightning_nst.report.settings import ReportSettings

__all__ = ["EXPERIMENTS", "Report", "ReportSettings", "main", "run"]

DESCRIPTION = """\
Run one of the study's experiments (or `all`) and write a report folder: captioned PNG figures, report.md with the
numbers, configs/ with one YAML per run (each rerunnable with `lightning-nst fit|predict -c`), and runs/ with their
outputs and TensorBoard events. A finished run is read back rather than run again, so an interrupted report resumes.
`all` goes on past an experiment that fails and exits with status 2 naming it, and writes index.md linking them
all. Random VGG weights are refused unless --allow_random_weights=true. Options may come from YAML: `-c report_cpu`
(the shipped CPU-sized settings) or `-c FILE.yaml`. A report refused for bad input leaves a new folder as it was.
"""

INDEX = "index.md"
"""The page ``report all`` writes in its folder, linking every report."""
INDEX_TITLE = "# The study's reports (lightning-nst report all)"
"""The first line of :data:`INDEX`: how ``report all`` knows the file as its own, to replace it."""


def parser() -> ArgumentParser:
    """The ``lightning-nst report`` argument parser."""
    parser = ArgumentParser(prog="lightning-nst report", description=DESCRIPTION, exit_on_error=False)
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "all"], help="Which experiment: " + ", ".join(EXPERIMENTS))
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML file of options")
    parser.add_class_arguments(ReportSettings, as_group=False)
    return parser


def main(args: list[str]) -> list[Path]:
    """Parse ``args`` and make the report(s); return the paths of the ``report.md`` files written.

    Raises:
        NSTError: On bad input; for ``all``, after every experiment was tried, naming those that failed.
    """
    parsed = parser()
    config = parsed.instantiate(parsed.parse_args(args))
    settings = {item.name: config[item.name] for item in fields(ReportSettings)}
    given = _command_line_value(args, "--out")
    if given is not None and not given.strip():
        raise NSTError("out: give a folder (got an empty --out)")
    if given is not None and settings["out"] is None:  # '~' or 'null' read as YAML's null: the folder typed is meant
        settings["out"] = given
    if config.experiment != "all":
        return [run(config.experiment, ReportSettings(**settings))]
    root = Path(settings["out"]).expanduser() if settings["out"] else Path("reports")
    index = root / INDEX
    if index.exists() and not _is_index(index):
        raise NSTError(f"out: {index} exists and was not written by lightning-nst report all; move it or choose --out")
    with weights_stated_once():
        report_features(ReportSettings(**settings), ["conv1_1"])  # random weights refused once, before any report
    written, failed = [], {}
    for name in EXPERIMENTS:
        try:
            written.append(run(name, ReportSettings(**{**settings, "out": str(root / name)})))
        except StoppedBySignal:
            raise
        except Exception as error:  # one experiment's failure must not cost the others
            found = NSTError.behind(error)
            if found is None:
                traceback.print_exc()  # a bug, not bad input: its traceback
            failed[name] = str(found) if found else repr(error)
            print(f"lightning-nst: report {name} failed: {failed[name]}", file=sys.stderr)
    if written:
        write_atomic(index, _index(root, written, failed).encode(), overwrite=True)
        print(f"[all] index: {index}")
    if failed:
        raise NSTError(
            f"experiment: {', '.join(failed)} failed (see above); the other reports are in {root}"
            if written
            else f"experiment: every experiment failed ({', '.join(failed)}; see above)"
        )
    return written


def _command_line_value(args: list[str], flag: str) -> str | None:
    """The last value ``args`` give ``flag`` (``--flag value`` or ``--flag=value``), as typed; ``None`` if none."""
    value = None
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _is_index(path: Path) -> bool:
    try:
        return path.is_file() and path.read_text(encoding="utf-8").startswith(INDEX_TITLE + "\n")
    except (OSError, UnicodeDecodeError):
        return False


def _index(root: Path, written: list[Path], failed: dict[str, str]) -> str:
    """``index.md``: each experiment's title, what it does in one line, and a link to its report.md (or why not)."""
    reports = {path.parent.name: path for path in written}
    lines = [INDEX_TITLE, ""]
    for name, experiment in EXPERIMENTS.items():
        summary = ((experiment.__doc__ or "").strip().splitlines() or [""])[0]
        if name in reports:
            title = reports[name].read_text(encoding="utf-8").splitlines()[0].removeprefix("# ")
            link = reports[name].relative_to(root).as_posix()
            lines.append(f"- [{title}]({link}) (`{name}`): {summary}")
        else:
            reason = (failed.get(name, "not made").splitlines() or [""])[0]
            lines.append(f"- `{name}`: {summary} **Failed**: {reason}")
    return "\n".join(lines) + "\n"
