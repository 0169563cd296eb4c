"""``lightning-nst report <experiment>``: the study's experiments as folders of captioned figures and report.md.

An ordinary client of the library: each run is a shipped config plus the report's settings (:mod:`.configs`), made
through :func:`lightning_nst.cli.run` by a :class:`Report` folder (:mod:`.folder`); :mod:`.experiments` holds the
five experiments.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import fields
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_nst.errors import NSTError, StoppedBySignal
from lightning_nst.report.experiments import EXPERIMENTS, run
from lightning_nst.report.folder import Report
from lightning_nst.report.settings import ReportSettings

__all__ = ["EXPERIMENTS", "Report", "ReportSettings", "main", "run"]

DESCRIPTION = """\
Run one of the study's experiments (or `all`) and write a report folder: captioned PNG figures, report.md with the
numbers, configs/ with one YAML per run (each rerunnable with `lightning-nst fit|predict -c`), and runs/ with their
outputs and TensorBoard events. A finished run is read back rather than run again, so an interrupted report resumes.
`all` goes on past an experiment that fails and exits with status 2 naming it. Options may come from YAML:
`--config configs/report_cpu.yaml`.
"""


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
    if config.experiment != "all":
        return [run(config.experiment, ReportSettings(**settings))]
    root = Path(settings["out"] or "reports")
    written, failed = [], []
    for name in EXPERIMENTS:
        try:
            written.append(run(name, ReportSettings(**{**settings, "out": str(root / name)})))
        except StoppedBySignal:
            raise
        except Exception as error:  # one experiment's failure must not cost the others
            found = NSTError.behind(error)
            if found is None:
                traceback.print_exc()  # a bug, not bad input: its traceback
            print(f"lightning-nst: report {name} failed: {found if found else repr(error)}", file=sys.stderr)
            failed.append(name)
    if failed:
        raise NSTError(
            f"experiment: {', '.join(failed)} failed (see above); the other reports are in {root}"
            if written
            else f"experiment: every experiment failed ({', '.join(failed)}; see above)"
        )
    return written
