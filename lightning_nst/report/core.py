"""What every report shares: its settings, its folder, the runs it makes through the CLI, and report.md."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_nst.diffusion import DEFAULT_MODEL
from lightning_nst.errors import NSTError
from lightning_nst.images import save_image, write_atomic
from lightning_nst.outputs import check_output_dir, file_digest
from lightning_nst.report.figures import captioned
from lightning_nst.vgg import DEFAULT_STYLE_LAYERS, VGG19Features, VGGConfig

TEXTURES = ["skimage:gravel", "skimage:brick", "skimage:grass", "skimage:immunohistochemistry", "skimage:coffee"]
"""Experiment 3's default textures: scikit-image's embedded samples, three grey and two in colour."""

FILES = "report-files.json"
"""The list, inside a report folder, of every file the report wrote there: the only files it ever removes."""


@dataclass
class ReportSettings:
    """Options of ``lightning-nst report``; each experiment uses those it needs.

    The defaults are the study's full-size settings (for a GPU and ImageNet weights); ``configs/report_cpu.yaml``
    shrinks them for a CPU.

    Attributes:
        out: Report folder; ``reports/<experiment>`` by default.
        overwrite: Replace a report in ``out`` that was made with other settings.
        size: Long edge, in pixels, of the optimised images (experiments 1-4).
        steps: Optimisation steps of every image-optimisation run.
        vgg: VGG19 weights and pooling of every run and of the report's own style measurements.
        content: Content image of experiment 1.
        texture: Texture image of experiment 2.
        textures: Texture images of experiment 3; each claim there is counted over every texture and seed.
        style: Style image of experiments 4 and 5.
        layers: Layers of experiment 1; by default all 37 (each conv with its relu, and the pools).
        style_layers: Style layers of experiments 3-5 and of the style loss all of them report.
        content_layer: Content layer of the NST runs of experiment 4.
        gram_weight: Style weight of Gram objectives.
        meanvar_weight: Style weight of mean/variance objectives.
        fraction: Experiment 2 counts the steps each layer set needs to reach this fraction of its initial loss.
        model: Stable Diffusion pipeline of experiments 4 and 5: a hub id or a local folder.
        tiny_vae: Optional ``AutoencoderTiny`` for the guidance gradient.
        prompt: Prompt of experiments 4 and 5.
        style_prompt: Words appended to the prompt for the prompt-only baseline of experiment 5.
        negative_prompt: Negative prompt of every generation.
        seed: Seed of the generations (and of the noise of image optimisation).
        seeds: Noise seeds of experiment 3's syntheses, each run on every texture.
        timing_repeats: Interleaved repetitions of experiment 3's timing of VGG + loss for each statistic.
        sampling_steps: DDIM sampling steps.
        image_size: Side of the generated images, in pixels; ``null`` for the pipeline's native size.
        cfg_scale: Classifier-free guidance scale.
        guidance_scale: Strength of the style guidance.
        guidance_size: Long edge the decoded images are resized to before VGG, for guidance and for every style
            loss in experiments 4 and 5.
        rows: Rows (points in time) of the tables of experiment 4.
        timesteps: Timesteps experiment 5 shows; each is matched to the nearest step of the sampler.
        accelerator: Lightning accelerator of every run.
        precision: Lightning precision of every run.
        progress_bar: Show Lightning's progress bars.
    """

    out: str | None = None
    overwrite: bool = False
    size: int = 256
    steps: int = 500
    vgg: VGGConfig = field(default_factory=VGGConfig)
    content: str = "skimage:astronaut"
    texture: str = "skimage:gravel"
    textures: list[str] = field(default_factory=lambda: list(TEXTURES))
    style: str = "skimage:immunohistochemistry"
    layers: list[str] | None = None
    style_layers: list[str] = field(default_factory=lambda: list(DEFAULT_STYLE_LAYERS))
    content_layer: str = "relu4_2"
    gram_weight: float = 1e6
    meanvar_weight: float = 1e3
    fraction: float = 0.01
    model: str = DEFAULT_MODEL
    tiny_vae: str | None = None
    prompt: str = "a lighthouse on a rocky coast at dusk"
    style_prompt: str = "in the style of a stained microscope slide, purple and brown blotches on white"
    negative_prompt: str = "blurry, low quality"
    seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    timing_repeats: int = 30
    sampling_steps: int = 50
    image_size: int | None = 512
    cfg_scale: float = 7.5
    guidance_scale: float = 0.2
    guidance_size: int = 256
    rows: int = 5
    timesteps: list[int] = field(default_factory=lambda: [999, 799, 599, 400, 200])
    accelerator: str = "auto"
    precision: str = "32-true"
    progress_bar: bool = True

    def check(self) -> None:
        """Raise naming the first option out of range."""
        for key in ("size", "steps", "sampling_steps", "guidance_size", "rows", "timing_repeats"):
            if getattr(self, key) < 1:
                raise NSTError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not 0 < self.fraction < 1:
            raise NSTError(f"fraction: must be between 0 and 1, got {self.fraction}")
        if not self.style_layers:
            raise NSTError("style_layers: give at least one VGG19 layer")
        if not self.textures:
            raise NSTError("textures: give at least one texture image")
        if not self.seeds:
            raise NSTError("seeds: give at least one seed")
        if len(set(self.seeds)) < len(self.seeds):
            raise NSTError(f"seeds: each seed once, got {self.seeds}")


def _inside(name: object) -> bool:
    """Whether ``name`` is a relative path that stays inside the folder it is relative to."""
    return isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


def _damaged_outputs(out: Path, done: str) -> str | None:
    """The first output of a finished run that is missing or differs from the sha256 its run recorded, if any."""
    try:
        if done == "summary.json":
            summary = json.loads((out / done).read_text(encoding="utf-8"))
            recorded = [(item["output"], item.get("sha256")) for item in summary["objectives"].values()]
            recorded.append((summary["grid"], summary.get("grid_sha256")))
        else:
            lines = (out / done).read_text(encoding="utf-8").splitlines()
            recorded = [(record["image"], record.get("sha256")) for record in map(json.loads, lines)]
    except (OSError, ValueError, KeyError, TypeError):
        return done
    for name, digest in recorded:
        if digest is None or not (out / name).is_file() or file_digest(out / name) != digest:
            return name
    return None


def lbfgs(history: int = 50) -> dict[str, Any]:
    """L-BFGS with one function evaluation per Lightning step and no line search, as the shipped image configs use it.

    Each objective of a run gets its own instance (see :class:`~lightning_nst.ImageOptimization`).
    """
    return {
        "class_path": "torch.optim.LBFGS",
        "init_args": {"lr": 1.0, "max_iter": 1, "history_size": history, "line_search_fn": None},
    }


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats are printed with 4 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "–" if not math.isfinite(value) else f"{value:.4g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    """A report folder: ``report.md``, figures, ``configs/`` (one YAML per run) and ``runs/`` (their outputs).

    Runs go through :func:`lightning_nst.cli.main`, exactly as ``lightning-nst fit|predict -c configs/<run>.yaml``
    from the same working directory would run them. A finished run whose config is unchanged is read back instead
    of being run again, so an interrupted report resumes where it stopped.
    """

    def __init__(self, experiment: str, title: str, settings: ReportSettings, layers: Sequence[str]) -> None:
        self.experiment = experiment
        self.settings = settings
        self.folder = Path(settings.out or Path("reports") / experiment)
        self.lines: list[str] = [f"# {title}", ""]
        self.figures: list[str] = []
        self._owned: set[str] = set()
        replace = self._check_folder()
        self.features: VGG19Features = settings.vgg.build(list(layers), key="vgg")
        """The report's own VGG19 trunk for ``layers``, with the weights every run uses."""
        self.weights = self.features.weights_used
        if replace:
            self._remove_owned(self.folder)
        self._write(self.folder / "report.yaml", self._settings_yaml().encode())

    def _settings_yaml(self) -> str:
        settings = {key: value for key, value in asdict(self.settings).items() if key != "overwrite"}
        return yaml.safe_dump({"experiment": self.experiment, **settings}, sort_keys=False)

    def _check_folder(self) -> bool:
        """Raise unless the folder is new, empty or this report's; return whether its files are to be replaced."""
        check_output_dir(self.folder, "out")
        recorded = self.folder / "report.yaml"
        owned = self._files.is_file()
        if owned:
            self._owned = self._read_files()
        if recorded.is_file() and recorded.read_text(encoding="utf-8") != self._settings_yaml():
            if not self.settings.overwrite:
                raise NSTError(
                    f"out: {self.folder} holds a report made with other settings (see {recorded}); choose another "
                    "folder or set --overwrite true"
                )
            if not owned:
                raise NSTError(
                    f"out: {self.folder} holds a report that does not list its files ({FILES} is missing), so "
                    "--overwrite cannot tell them from yours; remove it by hand or choose another folder"
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

    def _remove_owned(self, under: Path) -> None:
        """Remove the recorded files below ``under``, then the folders that leaves empty; nothing else."""
        prefix = under.relative_to(self.folder).as_posix()
        chosen = {name for name in self._owned if prefix == "." or name == prefix or name.startswith(prefix + "/")}
        folders: set[Path] = set()
        for name in sorted(chosen):
            path = self.folder / name
            if path.is_file() or path.is_symlink():
                path.unlink()
            folders.update(parent for parent in path.parents if self.folder in parent.parents)
        for folder in sorted(folders, key=lambda path: len(path.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
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
        from lightning_nst.cli import main

        path = self.folder / "configs" / f"{run}.yaml"
        text = f"# {self.experiment} report, run {run}: lightning-nst {subcommand} -c {path}\n"
        text += yaml.safe_dump(config, sort_keys=False)
        out = self.run_dir(run)
        if (out / done).is_file() and path.is_file() and path.read_text(encoding="utf-8") == text:
            damaged = _damaged_outputs(out, done)
            if not damaged:
                print(f"[{self.experiment}] {run}: finished earlier, reading {out}")
                return out
            print(f"[{self.experiment}] {run}: {damaged} no longer matches its recorded sha256; running it again")
        if out.exists():  # a run of this report that did not finish, or was made by an older config
            self._remove_owned(out)
            left = sorted(str(file) for file in out.rglob("*") if not file.is_dir())
            if left:
                raise NSTError(
                    f"out: {out} holds files this report did not record as its own (a run killed before it could "
                    f"list them?), e.g. {left[0]}; remove {out} by hand to run it again"
                )
        self._write(path, text.encode())
        print(f"[{self.experiment}] {run}: lightning-nst {subcommand} -c {path}")
        try:
            with warnings.catch_warnings():
                # LightningCLI warns when given args while sys.argv holds other ones: here they are the report's.
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
                main([subcommand, "-c", str(path)])
        finally:
            # The run folder was empty or absent before the run, so everything in it now is the run's.
            self._own([file for file in out.rglob("*") if not file.is_dir()] if out.is_dir() else [])
        if not (out / done).is_file():
            raise NSTError(f"{path}: the run ended without writing {out / done}")
        return out

    def fit(self, run: str, config: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
        """Run ``lightning-nst fit`` on ``config`` (once) and return its ``summary.json``.

        ``seed`` seeds everything in the run; the settings' ``seed`` by default.
        """
        seed = self.settings.seed if seed is None else seed
        out = self._run("fit", run, {"seed_everything": seed, **config}, "summary.json")
        return json.loads((out / "summary.json").read_text(encoding="utf-8"))

    def predict(self, run: str, config: dict[str, Any]) -> list[dict[str, Any]]:
        """Run ``lightning-nst predict`` on ``config`` (once) and return its manifest's records."""
        config = {"seed_everything": self.settings.seed, "return_predictions": False, **config}
        out = self._run("predict", run, config, "predictions.jsonl")
        lines = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]

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
        self.text(f"**{caption}** VGG19 weights: {self.weights}.", "", md_table(headers, rows))

    def figure(self, name: str, image: Image.Image, title: str, notes: Sequence[str] = ()) -> None:
        """Save a captioned PNG (title above; notes and the VGG weights below) and link it from ``report.md``."""
        self._own([self.folder / name])
        save_image(
            captioned(image, title, [*notes, f"VGG19 weights: {self.weights}"]), self.folder / name, overwrite=True
        )
        self.figures.append(name)
        self.text(f"![{title}]({name})")

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
