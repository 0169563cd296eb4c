"""Ctrl-C in library runs and in the test suite: every signal handler given back, a Ctrl-C a KeyboardInterrupt.

``lightning-nst`` itself keeps its graceful stop (``test_fit_faults.py``: first signal after the step, exit 130/143);
here a run started from Python, as a test or notebook starts it, must end in the ``KeyboardInterrupt`` its caller
relies on and leave the caller's handlers as they were.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import lightning_nst
from lightning_nst.cli.lightning import run
from lightning_nst.core.errors import StoppedBySignal
from lightning_nst.main import main
from lightning_nst.nst.data import ImageTargets
from lightning_nst.nst.module import ImageOptimization
from tests.conftest import CONFIGS, REPO

pytestmark = pytest.mark.usefixtures("one_thread")

FIT = [
    "fit", "-c", str(CONFIGS / "texture_gram.yaml"), "--data.init_args.size=32", "--trainer.max_steps=6",
    "--model.init_args.vgg.weights=random", "--trainer.enable_progress_bar=false",
]  # fmt: skip


def handlers() -> dict[int, Any]:
    """The handler of every signal a process may handle."""
    return {signum: signal.getsignal(signum) for signum in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}}


def sender(signum: int, times: int = 1) -> str:
    return (
        "--trainer.callbacks+={class_path: tests.helpers.SignalAtStep, "
        f"init_args: {{step: 2, signum: {int(signum)}, times: {times}}}}}"
    )


def test_library_runs_end_a_ctrl_c_in_a_keyboard_interrupt_and_give_every_handler_back() -> None:
    before = handlers()
    assert before[signal.SIGINT] is signal.default_int_handler  # as in any Python program, pytest included

    with pytest.raises(KeyboardInterrupt) as first:  # stopped after the step, its checkpoint kept
        run([*FIT, sender(signal.SIGINT)])
    assert isinstance(first.value, StoppedBySignal) and first.value.exit_code == 130
    assert "stopped by SIGINT at step 2" in first.value.message
    assert handlers() == before

    with pytest.raises(KeyboardInterrupt) as twice:  # a second Ctrl-C before the step ended: at once
        run([*FIT, sender(signal.SIGINT, times=2)])
    assert isinstance(twice.value, StoppedBySignal) and "at once by a second SIGINT" in twice.value.message
    assert handlers() == before  # not SIG_IGN, as Lightning leaves it after a KeyboardInterrupt

    # During setup, before Lightning's signal connector saves the handlers it would put back
    with pytest.raises(KeyboardInterrupt):
        run([*FIT, "--trainer.callbacks+=tests.helpers.InterruptInSetup"])
    assert handlers() == before

    with pytest.raises(StoppedBySignal) as term:  # SIGTERM is no KeyboardInterrupt: its default kills the process
        run([*FIT, sender(signal.SIGTERM)])
    assert not isinstance(term.value, KeyboardInterrupt) and term.value.exit_code == 143
    assert handlers() == before


def test_the_command_exits_130_on_ctrl_c_as_a_keyboard_interrupt_too() -> None:
    with pytest.raises(SystemExit) as stopped:
        main([*FIT, sender(signal.SIGINT)])
    assert stopped.value.code == 130 and isinstance(stopped.value, KeyboardInterrupt)
    with pytest.raises(SystemExit) as term:
        main([*FIT, sender(signal.SIGTERM)])
    assert term.value.code == 143 and not isinstance(term.value, KeyboardInterrupt)


def test_a_caller_s_own_sigint_handler_or_sig_ign_stays_theirs() -> None:
    calls: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        cli = run([*FIT, sender(signal.SIGINT)])  # the caller's handler takes the signal; the run goes on
        assert cli.trainer.global_step == 6 and calls == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's Ctrl-C: ignored, also during the run
        assert run([*FIT, sender(signal.SIGINT)]).trainer.global_step == 6
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_api_raises_keyboard_interrupt_and_gives_every_handler_back(monkeypatch: pytest.MonkeyPatch) -> None:
    before = handlers()

    def interrupt_at_step_2(self: ImageOptimization, *args: Any) -> None:
        if self.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ImageOptimization, "on_train_batch_end", interrupt_at_step_2, raising=False)
    with pytest.raises(KeyboardInterrupt):  # Lightning makes it sys.exit(1)
        lightning_nst.texture("sample:gravel", size=32, steps=50, weights="random", optimizer="adam")
    assert handlers() == before
    monkeypatch.undo()

    def interrupted_setup(self: ImageTargets, stage: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ImageTargets, "setup", interrupted_setup)
    with pytest.raises(KeyboardInterrupt):
        lightning_nst.texture("sample:gravel", size=32, steps=5, weights="random")
    assert handlers() == before  # SIGINT is not left ignored


TESTS = """
from pathlib import Path

from lightning_nst.main import main

ARGS = {args!r}


def test_a_long_fit():
    main(ARGS)


def test_after_it():
    Path("after").touch()
"""


def test_ctrl_c_stops_a_test_run_of_fits_in_process(tmp_path: Path) -> None:
    """The whole test run stops, not just the test whose run took the Ctrl-C (``make test`` could not be stopped)."""
    adam = "--model.init_args.optimizer={class_path: torch.optim.Adam, init_args: {lr: 0.01}}"
    started = "--trainer.callbacks+={class_path: tests.helpers.TouchAtStep, init_args: {path: started, step: 1}}"
    args = [*FIT, "--trainer.max_steps=100000", adam, started]
    (tmp_path / "test_fits.py").write_text(TESTS.format(args=args), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    child = subprocess.Popen(
        [*command, "test_fits.py"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "started").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "started").exists(), child.communicate(timeout=60)[0][-3000:]
        child.send_signal(signal.SIGINT)
        output = child.communicate(timeout=120)[0]  # the bound: one step, the checkpoint and pytest's exit
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == pytest.ExitCode.INTERRUPTED, output[-3000:]
    assert "Interrupted: 130" in output, output[-3000:]  # pytest's line for the KeyboardInterrupt that ended it
    assert not (tmp_path / "after").exists()  # the run ended with the interrupted test
    assert (tmp_path / "logs/texture_gram/version_0/checkpoints/last.ckpt").is_file()  # the run's stop kept its step
