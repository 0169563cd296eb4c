"""How a run stops on SIGINT or SIGTERM and what it leaves: the step kept, the command that resumes, no refused folder.

:class:`StopOnSignal` stops ``fit`` after the current step (saving ``last.ckpt``) and ``predict`` after the current
batch; :func:`resume_command` and :func:`resume_in_run_folder` make a resumed run finish where the stopped one was;
:class:`RemoveRefusedRunFolder` removes the run folder of a run that bad input refused.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_nst.cli import console
from lightning_nst.core.errors import DivergenceError, NSTError, StoppedBySignal
from lightning_nst.core.files import checkpoint_run_folder
from lightning_nst.nst.writer import ImageWriter
from lightning_nst.outputs import SUMMARY


class StopOnSignal(L.Callback):
    """Treat SIGTERM like Ctrl-C: stop after the current step (fit) or batch (predict) and keep what is done.

    Lightning's own SIGTERM handling (``trainer.received_sigterm``) stops ``fit`` without a checkpoint and exits 0,
    and does not stop ``predict`` at all; this callback stops both at a boundary where the state is whole, saves
    ``last.ckpt`` where the run's ModelCheckpoint saves (else ``<run>/checkpoints``) during ``fit``, and says in
    :attr:`message` how to resume; :func:`run` then raises :class:`~lightning_nst.core.errors.StoppedBySignal`, which
    ``lightning-nst`` prints, exiting with ``128 + signal``. A second signal interrupts at once, as Ctrl-C does.
    """

    def __init__(self, args: Sequence[str] | None = None, resume: Callable[[Path], str] | None = None) -> None:
        self.args = list(args) if args is not None else None
        """The command's arguments, for the resume command in :attr:`message`; ``None``: unknown."""
        self.resume = resume
        """The command that resumes from a checkpoint, where it is not ``args`` with ``--ckpt_path`` (a shortcut's)."""
        self.signum: int | None = None
        self.stopped = False
        self.checkpoint: Path | None = None
        self.checkpoint_dir: Path | None = None
        """Where to save ``last.ckpt`` instead of the run's ModelCheckpoint folder (a resumed run's own)."""
        self.interrupted: Path | None = None
        self.step = 0
        self.message = ""
        """What was kept and how to resume, once the run has stopped."""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(signum)  # the second signal's number, for run's exit status
        self.signum = signum

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        """Take SIGTERM and SIGINT for the duration where Python's defaults hold them; restore every handler after.

        A default SIGTERM would kill the process mid-step and a default SIGINT raise ``KeyboardInterrupt`` wherever
        it lands; a handler the caller installed, or ``SIG_IGN`` (a background job's SIGINT), stays theirs. A run
        stopped by SIGINT ends in a ``KeyboardInterrupt`` all the same (:func:`run`), so a caller that relies on one
        (a test runner, a notebook) stops as it would have, one step later and with the step kept.
        """
        defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
        with console.restoring_signal_handlers():
            if threading.current_thread() is threading.main_thread():  # the only thread that may install handlers
                for signum, default in defaults.items():
                    if signal.getsignal(signum) == default:
                        signal.signal(signum, self._handle)
            yield

    def _stop(self) -> None:
        if self.signum is not None:
            self.stopped = True
            raise SIGTERMException(128 + self.signum)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:  # noqa: D102
        self._stop()

    def on_predict_batch_end(self, trainer: L.Trainer, *args: Any) -> None:  # noqa: D102
        self._stop()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Save a resumable checkpoint (fit) or merge the finished items' records (predict)."""
        # Not on a second signal's KeyboardInterrupt, which may come in the middle of a step.
        if self.signum is None or not isinstance(exception, SIGTERMException):
            return
        self.stopped = True
        self.step = trainer.global_step
        if trainer.training:
            folder = self.checkpoint_dir
            if folder is None and isinstance(trainer.checkpoint_callback, ModelCheckpoint):
                folder = trainer.checkpoint_callback.dirpath
            folder = Path(folder) if folder else Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
            self.checkpoint = folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
            # All a resume needs; left unset, Lightning logs that it chose this.
            trainer.save_checkpoint(self.checkpoint, weights_only=False)
            writer = next((c for c in trainer.callbacks if isinstance(c, ImageWriter)), None)
            if writer is not None:
                self.interrupted = writer.save_interrupted(trainer, pl_module)
        elif trainer.predicting and trainer.world_size == 1:
            # Lightning skips callbacks' teardown on an exception; the writer merges its records there.
            for callback in trainer.callbacks:
                if isinstance(callback, BasePredictionWriter):
                    callback.teardown(trainer, pl_module, "predict")
        self.message = self._message(trainer)

    def _message(self, trainer: L.Trainer) -> str:
        """One line saying what was kept and how to resume."""
        name = signal.Signals(self.signum or signal.SIGTERM).name
        if self.checkpoint is not None:
            kept = f"; the current images are in {self.interrupted} as *.interrupted.png" if self.interrupted else ""
            writer = next((c for c in trainer.callbacks if isinstance(c, ImageWriter)), None)
            if writer is not None and writer.partial is not None:
                kept += f"; the best image so far is in {writer.partial}"
            if self.resume is not None:
                resume = f"resume with: {self.resume(self.checkpoint)}"
            elif self.args is None:
                resume = f"resume with the same command and --ckpt_path {shlex.quote(str(self.checkpoint))}"
            else:
                resume = f"resume with: {resume_command(self.args, self.checkpoint)}"
            return f"stopped by {name} at step {self.step}{kept}; {resume}"
        writer = next((c for c in trainer.callbacks if isinstance(c, BasePredictionWriter)), None)
        given = getattr(writer, "output_dir", None)
        if given is not None:  # the command names the folder already (generate's -o, or the config's writer)
            return f"stopped by {name}; finished items are kept in {given}: rerun the same command to generate the rest"
        folder = trainer.log_dir or "."
        return (
            f"stopped by {name}; finished items are kept in {folder}: rerun the same command with "
            f"--trainer.callbacks.init_args.output_dir {shlex.quote(str(folder))} to generate the rest"
        )


class InterruptedBySignal(StoppedBySignal, KeyboardInterrupt):
    """A run stopped by Ctrl-C (SIGINT): a :class:`StoppedBySignal`, and a ``KeyboardInterrupt`` for callers that stop.

    pytest stops the whole test run on it, a notebook cell its run, a script its ``except KeyboardInterrupt``.
    """


def stopped_by(signum: int, message: str) -> StoppedBySignal:
    """The exception of a run stopped by ``signum``: :class:`InterruptedBySignal` for SIGINT."""
    return (InterruptedBySignal if signum == signal.SIGINT else StoppedBySignal)(signum, message)


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` or ``option=VALUE`` (e.g. ``--resume CHECKPOINT``), wherever it stands."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            kept.append(arg)
    return kept


def resume_command(args: Sequence[str], checkpoint: Path) -> str:
    """The shell command that resumes ``lightning-nst <args>`` from ``checkpoint``: the same arguments, quoted."""
    return shlex.join(["lightning-nst", *without_option(args, "--ckpt_path"), "--ckpt_path", str(checkpoint)])


def resume_in_run_folder(trainer: L.Trainer, ckpt_path: str, stop: StopOnSignal) -> None:
    """Let a run resumed from ``<run>/checkpoints/*.ckpt`` write its results into ``<run>``, if that holds none.

    The logger still starts a new version folder (TensorBoard's curves of the resumed steps), but the images of an
    interrupted run belong next to its ``*.interrupted.png``: the ImageWriter, when its ``output_dir`` is unset,
    writes into the interrupted run's folder, and a second stop saves ``last.ckpt`` back into its ``checkpoints``.
    A finished run's folder (it holds ``summary.json``) is never written into: its results stay, the new ones go to
    the new run folder. One info line says which.
    """
    writer = next((c for c in trainer.callbacks if isinstance(c, ImageWriter)), None)
    folder = checkpoint_run_folder(ckpt_path)
    if writer is None or writer.output_dir is not None or folder is None:
        return
    if (folder / SUMMARY).exists():
        rank_zero_info(f"Resuming the finished run {folder}: results go to this run's folder {trainer.log_dir}")
        return
    writer.output_dir = str(folder)
    writer.directory = folder
    stop.checkpoint_dir = Path(ckpt_path).expanduser().parent
    rank_zero_info(f"Resuming {folder}: results go there, TensorBoard logs to {trainer.log_dir}")


class RemoveRefusedRunFolder(L.Callback):
    """Remove the logger's run folder when bad input (an NSTError) stops the run, if the run made it.

    The logger creates its run folder before any setup hook, where most checks run; a run refused there must not
    leave that folder behind looking like a result. A folder that existed before, or that holds anything but the
    config, hyperparameters and TensorBoard events (a kept image), stays. The parent folders the run created
    (``logs/<name>``) are removed too, while empty.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.existed = folder is not None and folder.exists()
        self.created = [parent for parent in folder.parents if not parent.exists()] if folder is not None else []

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:  # noqa: D102
        error = NSTError.behind(exception)
        # A diverged run was not refused: it ran, and its error names the folder of its *.last_good.png.
        if self.folder is None or self.existed or error is None or isinstance(error, DivergenceError):
            return
        if not trainer.is_global_zero:
            return
        if self.folder.is_dir() and _only_bookkeeping(self.folder):
            # Lightning finalizes the loggers after this hook: a TensorBoard writer with events still buffered would
            # then write them into the removed folder and fail. Finalized here first, it has nothing left to write.
            for logger in trainer.loggers:
                logger.finalize("failed")
            shutil.rmtree(self.folder, ignore_errors=True)
        for parent in self.created:  # innermost first; rmdir leaves a folder that is not empty
            with contextlib.suppress(OSError):
                parent.rmdir()


def _only_bookkeeping(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but the config, hyperparameters and TensorBoard events of a run."""
    for path in folder.rglob("*"):
        if path.is_file() and path.name not in ("config.yaml", "hparams.yaml"):
            if not path.name.startswith("events.out.tfevents."):
                return False
    return True
