"""A report folder: its files, the runs it makes through :func:`lightning_nst.cli.lightning.run`, and report.md."""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from itertools import takewhile
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_nst.cli import lightning as cli
from lightning_nst.core.errors import DivergenceError, NSTError
from lightning_nst.core.files import check_output_dir, file_digest, write_atomic
from lightning_nst.core.images import save_image
from lightning_nst.core.vgg import VGG19Features
from lightning_nst.outputs import MANIFEST, SUMMARY, FitSummary, GenerationRecord, read_manifest
from lightning_nst.report.figures import captioned, finish, relative_weights, render, short_weights
from lightning_nst.report.settings import ReportSettings

RANDOM_WARNING = "VGG19 ImageNet weights are unavailable"
"""The start of the warning :class:`~lightning_nst.core.vgg.VGG19Features` gives when ``auto`` falls back to random."""
RUN_LOGGERS = (
    "lightning_utilities.core.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
"""The loggers of Lightning's ``rank_zero_info``, which says ``VGG19 weights: ...`` at the start of every fit."""

LAST_CHECKPOINT = "checkpoints/last.ckpt"
"""What a training run of a report leaves in its run folder when it finished."""

FILES = "report-files.json"
"""The list, inside a report folder, of every file the report wrote there: the only files it ever removes."""


def _inside(name: object) -> bool:
    """Whether ``name`` is a relative path that stays inside the folder it is relative to."""
    return isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


def _flow(value: Any) -> str:
    """``value`` as one line of YAML (flow style), for a message."""
    return yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip().removesuffix("...").strip()


def _damaged_outputs(out: Path, done: str) -> str | None:
    """The first output of a finished run that is missing or differs from the sha256 its run recorded, if any."""
    if done == LAST_CHECKPOINT:  # a training run records no digests; its checkpoint is read when it is used
        return None
    try:
        if done == SUMMARY:
            summary = FitSummary.read(out)
            recorded = [(item.output, item.sha256) for item in summary.objectives.values()]
            recorded.append((summary.grid, summary.grid_sha256))
        else:
            recorded = [(record.image, record.sha256) for record in read_manifest(out / done)]
    except (OSError, ValueError, KeyError, TypeError):  # unreadable, not JSON, or not of this version's records
        return done
    for name, digest in recorded:
        if digest is None or not (out / name).is_file() or file_digest(out / name) != digest:
            return name
    return None


def _remove_listed(folder: Path, names: Iterable[str]) -> None:
    """Remove the files ``names`` (relative to ``folder``), then the folders inside it that leaves empty."""
    folders: set[Path] = set()
    for name in sorted(names):
        path = folder / name
        if path.is_file() or path.is_symlink():
            path.unlink()
        folders.update(parent for parent in path.parents if folder in parent.parents)
    for inner in sorted(folders, key=lambda path: len(path.parts), reverse=True):
        if inner.is_dir() and not any(inner.iterdir()):
            inner.rmdir()


def report_folder(experiment: str, settings: ReportSettings) -> Path:
    """The folder of the report of ``experiment``: ``settings.out``, or ``reports/<experiment>``."""
    return Path(settings.out).expanduser() if settings.out else Path("reports") / experiment


@contextmanager
def undone_if_refused(folder: Path) -> Iterator[None]:
    """Leave a report folder that was new or empty as it was, should the report made in it be refused.

    A refusal is bad input (an :class:`~lightning_nst.core.errors.NSTError`): the report removes the files it listed in
    :data:`FILES`, the list itself and the folders it created, so the corrected command runs without ``--overwrite``.
    A folder that held anything before keeps everything; so does a run that diverged, whose message points at the
    last finite images it kept, and a report stopped by a signal, which resumes.
    """
    created = list(takewhile(lambda path: not path.exists() and not path.is_symlink(), (folder, *folder.parents)))
    fresh = bool(created) or (folder.is_dir() and not any(folder.iterdir()))
    try:
        yield
    except Exception as error:
        refusal = NSTError.behind(error)
        if fresh and refusal is not None and not isinstance(refusal, DivergenceError):
            _remove_report(folder, created)
        raise


def _remove_report(folder: Path, created: Sequence[Path]) -> None:
    """Remove every file :data:`FILES` lists in ``folder``, the list, and the ``created`` folders left empty."""
    listed = folder / FILES
    try:
        names = json.loads(listed.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        names = None  # never written: refused before the report wrote anything
    if isinstance(names, list) and all(_inside(name) for name in names):
        _remove_listed(folder, names)
        listed.unlink()
    for path in created:  # deepest first
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


class _WithoutWeightsLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("VGG19 weights:")


@contextmanager
def weights_stated_once() -> Iterator[None]:
    """Silence what each run says about its VGG weights (the report states them once, at its start).

    That is the fit's ``VGG19 weights: ...`` log line and the random-weights warning of ``weights: auto``.
    """
    loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
    quiet = _WithoutWeightsLine()
    shown = warnings.showwarning

    # Not warnings.catch_warnings or filterwarnings: any change of the filters makes Python show again every warning
    # it has shown once (Lightning's deprecations, say), so each report would repeat them. Replacing showwarning is
    # the documented hook that leaves the filters alone.
    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if not str(message).startswith(RANDOM_WARNING):
            shown(message, category, *args, **kwargs)

    for logger in loggers:
        logger.addFilter(quiet)
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown
        for logger in loggers:
            logger.removeFilter(quiet)


def report_features(settings: ReportSettings, layers: Sequence[str]) -> VGG19Features:
    """The report's VGG19 trunk for ``layers``: the weights every run of the report uses.

    The random-weights warning of ``weights: auto`` is left to :func:`weights_stated_once` around the report.

    Raises:
        NSTError: If the weights resolve to random ones and ``allow_random_weights`` is not set.
    """
    features = settings.vgg.build(list(layers), key="vgg")
    if features.weights_used.startswith("random") and not settings.allow_random_weights:
        raise NSTError(
            f"vgg.weights: {settings.vgg.weights!r} gives random VGG19 weights ({features.weights_used}), on which "
            "the report's figures and verdicts say nothing about the study; give a weights file (--vgg.weights=PATH, "
            "or $LIGHTNING_NST_VGG_WEIGHTS with weights auto) or pass --allow_random_weights=true"
        )
    return features


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats are printed with 4 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "–" if not math.isfinite(value) else f"{value:.4g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


ALLOW_LINE = "allow_random_weights: true  # the weights are random: making this report again needs it too\n"
"""The line ``report.yaml`` ends with when the report was made on random VGG weights."""


class Report:
    """A report folder: ``report.md``, figures, ``configs/`` (one YAML per run) and ``runs/`` (their outputs).

    Runs go through :func:`~lightning_nst.cli.lightning.run`, exactly as ``lightning-nst fit|predict -c
    configs/<run>.yaml``
    from the same working directory would run them; bad input raises NSTError. A finished run whose config is
    unchanged is read back instead of being run again, so an interrupted report resumes where it stopped.
    """

    def __init__(self, experiment: str, title: str, settings: ReportSettings, layers: Sequence[str], runs: int) -> None:
        self.experiment = experiment
        self.runs = runs
        """How many runs the report makes, for its progress lines ``run k/N``."""
        self._started = 0
        self._seconds: list[float] = []
        self.settings = settings
        self.folder = report_folder(experiment, settings)
        self.lines: list[str] = [f"# {title}", ""]
        self.figures: list[str] = []
        self._owned: set[str] = set()
        replace = self._check_folder()
        self.features: VGG19Features = report_features(settings, layers)
        """The report's own VGG19 trunk for ``layers``, with the weights every run uses."""
        self.weights = self.features.weights_used
        allowed = " (allowed by --allow_random_weights)" if self.weights.startswith("random") else ""
        print(f"[{experiment}] VGG19 weights: {self.weights}{allowed}")
        if replace:
            self._remove_owned(self.folder)
        # On random weights the report was only made because it was allowed: `--config report.yaml` must allow it too.
        report_yaml = self._settings_yaml(allow_random=self.weights.startswith("random"))
        self._write(self.folder / "report.yaml", report_yaml.encode())

    def _settings_yaml(self, allow_random: bool = False) -> str:
        """The report's settings as ``report.yaml`` holds them; ``allow_random`` adds :data:`ALLOW_LINE`."""
        # Neither option changes what the report holds, so a rerun with or without them is the same report.
        settings = {
            key: value
            for key, value in asdict(self.settings).items()
            if key not in ("overwrite", "allow_random_weights")
        }
        text = yaml.safe_dump({"experiment": self.experiment, **settings}, sort_keys=False)
        return text + ALLOW_LINE if allow_random else text

    def _changed_settings(self, recorded: str) -> list[str]:
        """The settings ``recorded`` (a ``report.yaml``) holds otherwise than this report, each as ``key: old -> new``.

        Empty when it is this report. A setting added to :class:`ReportSettings` after the report was made is missing
        from its ``report.yaml``; at its default it changes no run, so that report is still this one.
        """
        recorded = recorded.replace(ALLOW_LINE, "")
        if recorded == self._settings_yaml():
            return []
        try:
            older = yaml.safe_load(recorded)
        except yaml.YAMLError:
            older = None
        if not isinstance(older, dict):
            return ["report.yaml: not a mapping of settings"]
        current = yaml.safe_load(self._settings_yaml())
        defaults = yaml.safe_load(yaml.safe_dump(asdict(ReportSettings())))
        changed = [
            f"{key}: {_flow(older.get(key, defaults.get(key)))} -> {_flow(value)}"
            for key, value in current.items()
            if older.get(key, defaults.get(key)) != value
        ]
        return changed + [f"{key}: not a setting of this version" for key in older if key not in current]

    def _check_folder(self) -> bool:
        """Raise unless the folder is new, empty or this report's; return whether its files are to be replaced."""
        check_output_dir(self.folder, "out")
        recorded = self.folder / "report.yaml"
        owned = self._files.is_file()
        if owned:
            self._owned = self._read_files()
        changed = self._changed_settings(recorded.read_text(encoding="utf-8")) if recorded.is_file() else []
        if changed:
            if not self.settings.overwrite:
                more = f", and {len(changed) - 1} more" if len(changed) > 1 else ""
                raise NSTError(
                    f"out: {self.folder} holds a report made with other settings ({changed[0]}{more}; see {recorded}, "
                    "which --config takes to make that report again); choose another folder or set --overwrite true"
                )
            if not owned:
                raise NSTError(
                    f"out: {self.folder} holds a report that does not list its files ({FILES} is missing), so "
                    "--overwrite cannot tell them from yours; remove it by hand or choose another folder"
                )
            # Checked before anything is removed: a file of the user's in a run folder would stop that run later,
            # after the old report's files were gone, leaving neither report.
            runs = self.folder / "runs"
            strangers = sorted(
                path
                for path in (runs.rglob("*") if runs.is_dir() else [])
                if not path.is_dir() and path.relative_to(self.folder).as_posix() not in self._owned
            )
            if strangers:
                raise NSTError(
                    f"out: {strangers[0]} is not one of the report's files, and --overwrite would have to stop at it "
                    "after removing the report; move it away, then run again"
                )
            return True
        if not owned and not recorded.is_file() and self.folder.is_dir() and any(self.folder.iterdir()):
            raise NSTError(f"out: {self.folder} exists and is not a report folder; choose a new or empty folder")
        return False

    # -- the files the report owns ----------------------------------------------------------------------------------

    @property
    def _files(self) -> Path:
        return self.folder / FILES

    def _read_files(self) -> set[str]:
        try:
            listed = json.loads(self._files.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise NSTError(f"out: {self._files} is not a list of report files; remove the folder by hand") from None
        if not isinstance(listed, list) or not all(_inside(name) for name in listed):
            raise NSTError(f"out: {self._files} is not a list of report files; remove the folder by hand")
        return set(listed)

    def _own(self, paths: Sequence[Path]) -> None:
        """Record ``paths`` (inside the folder) as written by this report, before or right after writing them."""
        names = {path.relative_to(self.folder).as_posix() for path in paths}
        if not names <= self._owned or not self._files.is_file():
            self._owned |= names
            self._save_files()

    def _save_files(self) -> None:
        text = json.dumps({"experiment": self.experiment, "files": sorted(self._owned)}, indent=1)
        write_atomic(self._files, text.encode(), overwrite=True)

    def _write(self, path: Path, data: bytes) -> Path:
        self._own([path])
        return write_atomic(path, data, overwrite=True)

    def write_file(self, name: str, data: bytes) -> Path:
        """Write ``data`` as ``name`` inside the report folder, one of the report's own files (replaced on a rerun)."""
        return self._write(self.folder / name, data)

    def _remove_owned(self, under: Path) -> None:
        """Remove the recorded files below ``under``, then the folders that leaves empty; nothing else."""
        prefix = under.relative_to(self.folder).as_posix()
        chosen = {name for name in self._owned if prefix == "." or name == prefix or name.startswith(prefix + "/")}
        _remove_listed(self.folder, chosen)
        self._owned -= chosen
        self._save_files()

    # -- runs -----------------------------------------------------------------------------------------------------

    def run_dir(self, run: str) -> Path:
        """The folder of run ``run``: its TensorBoard events and outputs."""
        return self.folder / "runs" / run

    def logger(self, run: str) -> dict[str, Any]:
        """TensorBoard logging straight into :meth:`run_dir`."""
        return {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {
                "save_dir": str(self.folder / "runs"),
                "name": "",
                "version": run,
                "default_hp_metric": False,
            },
        }

    def trainer(self, run: str, **extra: Any) -> dict[str, Any]:
        """Trainer options every run shares."""
        return {
            "accelerator": self.settings.accelerator,
            "devices": 1,
            "precision": self.settings.precision,
            "logger": self.logger(run),
            "enable_progress_bar": self.settings.progress_bar,
            "enable_model_summary": False,
            **extra,
        }

    def _run(self, subcommand: str, run: str, config: dict[str, Any], done: str) -> Path:
        path = self.folder / "configs" / f"{run}.yaml"
        text = f"# {self.experiment} report, run {run}: lightning-nst {subcommand} -c {path}\n"
        text += yaml.safe_dump(config, sort_keys=False)
        out = self.run_dir(run)
        self._started += 1
        progress = f"[{self.experiment}] run {self._started}/{self.runs}: {run}"
        if (out / done).is_file() and path.is_file() and path.read_text(encoding="utf-8") == text:
            damaged = _damaged_outputs(out, done)
            if not damaged:
                print(f"{progress}: finished earlier, reading {out}")
                return out
            print(f"{progress}: {damaged} no longer matches its recorded sha256; running it again")
        if out.exists():  # a run of this report that did not finish, or was made by an older config
            self._remove_owned(out)
            left = sorted(str(file) for file in out.rglob("*") if not file.is_dir())
            if left:
                raise NSTError(
                    f"out: {out} holds files this report did not record as its own (a run killed before it could "
                    f"list them?), e.g. {left[0]}; remove {out} by hand to run it again"
                )
        self._write(path, text.encode())
        # The mean duration of the runs made so far, times the runs left (this one included); runs read back from an
        # earlier report take no time and are not counted.
        left = max(self.runs - self._started + 1, 1)
        eta = _clock(statistics.fmean(self._seconds) * left) if self._seconds else "--:--"
        print(f"{progress} (ETA {eta}): lightning-nst {subcommand} -c {path}", flush=True)
        started = time.monotonic()
        try:
            cli.run([subcommand, "-c", str(path)])
        finally:
            self._seconds.append(time.monotonic() - started)
            # The run folder was empty or absent before the run, so everything in it now is the run's.
            self._own([file for file in out.rglob("*") if not file.is_dir()] if out.is_dir() else [])
        if not (out / done).is_file():
            raise NSTError(f"{path}: the run ended without writing {out / done}")
        return out

    def fit(self, run: str, config: dict[str, Any], seed: int | None = None) -> FitSummary:
        """Run ``lightning-nst fit`` on ``config`` (once) and return its ``summary.json``.

        ``seed`` seeds everything in the run; the settings' ``seed`` by default.
        """
        seed = self.settings.seed if seed is None else seed
        return FitSummary.read(self._run("fit", run, {"seed_everything": seed, **config}, SUMMARY))

    def train(self, run: str, config: dict[str, Any]) -> Path:
        """Run ``lightning-nst fit`` of a training ``config`` (once) and return its ``checkpoints/last.ckpt``."""
        config = {"seed_everything": self.settings.seed, **config}
        return self._run("fit", run, config, LAST_CHECKPOINT) / LAST_CHECKPOINT

    def predict(self, run: str, config: dict[str, Any]) -> list[GenerationRecord]:
        """Run ``lightning-nst predict`` on ``config`` (once) and return its manifest's records."""
        config = {"seed_everything": self.settings.seed, "return_predictions": False, **config}
        return read_manifest(self._run("predict", run, config, MANIFEST) / MANIFEST)

    def scalars(self, run: str, tag: str) -> tuple[list[int], list[float]]:
        """Steps and values of a TensorBoard scalar of run ``run``."""
        events = EventAccumulator(str(self.run_dir(run)), size_guidance={"scalars": 0})
        events.Reload()
        if tag not in events.Tags()["scalars"]:
            raise NSTError(f"{self.run_dir(run)}: no TensorBoard scalar {tag!r}")
        points = events.Scalars(tag)
        return [point.step for point in points], [point.value for point in points]

    # -- report.md --------------------------------------------------------------------------------------------------

    def text(self, *lines: str) -> None:
        """Add paragraphs to ``report.md``."""
        self.lines += [*lines, ""]

    def table(self, caption: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Add a captioned table, stating the VGG weights."""
        self.text(f"**{caption}** VGG19 weights: {relative_weights(self.weights)}.", "", md_table(headers, rows))

    def figure(self, name: str, image: Image.Image, title: str, notes: Sequence[str] = ()) -> None:
        """Save a captioned PNG (title above; notes and the VGG weights below) and link it from ``report.md``."""
        self._own([self.folder / name])
        save_image(captioned(image, title, [*notes, self._weights_line]), self.folder / name, overwrite=True)
        self.figures.append(name)
        self.text(f"![{title}]({name})")

    def plot(self, name: str, figure: Figure, title: str, notes: Sequence[str] = ()) -> None:
        """Save a plot as ``name`` (PNG) and beside it as SVG, titled, with the notes and the VGG weights below."""
        finish(figure, title, [*notes, self._weights_line])
        svg = Path(name).with_suffix(".svg").as_posix()
        self._write(self.folder / name, render(figure, "png"))
        self._write(self.folder / svg, render(figure, "svg"))
        self.figures.append(name)
        self.text(f"![{title}]({name})", f"[SVG]({svg})")

    @property
    def _weights_line(self) -> str:
        return f"VGG19 weights: {short_weights(self.weights)}"

    def write(self) -> Path:
        """Write ``report.md`` and say where the report is."""
        configs = sorted((self.folder / "configs").glob("*.yaml"))
        self.text(
            "## Reproduce",
            f"`lightning-nst report {self.experiment} --config {self.folder / 'report.yaml'}` makes this report "
            "again; each run alone is `lightning-nst fit|predict -c <config>` with these configs (run from the "
            "folder the report was made in):",
            "\n".join(f"- [{path.name}](configs/{path.name})" for path in configs),
            f"TensorBoard curves: `tensorboard --logdir {self.folder / 'runs'}`.",
        )
        path = self._write(self.folder / "report.md", "\n".join(self.lines).encode())
        print(f"[{self.experiment}] report: {path} ({len(self.figures)} figures)")
        return path
