"""``lightning-nst report <experiment>``: the study's experiments as folders of captioned figures and report.md."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_nst.report.core import Report, ReportSettings
from lightning_nst.report.experiments import EXPERIMENTS, run

__all__ = ["EXPERIMENTS", "Report", "ReportSettings", "main", "run"]

DESCRIPTION = """\
Run one of the study's experiments (or `all`) and write a report folder: captioned PNG figures, report.md with the
numbers, configs/ with one YAML per run (each rerunnable with `lightning-nst fit|predict -c`), and runs/ with their
outputs and TensorBoard events. A finished run is read back rather than run again, so an interrupted report resumes.
Options may come from YAML: `--config configs/report_cpu.yaml`.
"""


def parser() -> ArgumentParser:
    """The ``lightning-nst report`` argument parser."""
    parser = ArgumentParser(prog="lightning-nst report", description=DESCRIPTION, exit_on_error=False)
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "all"], help="Which experiment: " + ", ".join(EXPERIMENTS))
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML file of options")
    parser.add_class_arguments(ReportSettings, as_group=False)
    return parser


def main(args: list[str]) -> list[Path]:
    """Parse ``args`` and make the report(s); return the paths of the ``report.md`` files written."""
    parsed = parser()
    config = parsed.instantiate(parsed.parse_args(args))
    settings = {item.name: config[item.name] for item in fields(ReportSettings)}
    if config.experiment != "all":
        return [run(config.experiment, ReportSettings(**settings))]
    root = Path(settings["out"] or "reports")
    return [run(name, ReportSettings(**{**settings, "out": str(root / name)})) for name in EXPERIMENTS]
