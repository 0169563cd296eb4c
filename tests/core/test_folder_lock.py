"""One run at a time owns an output folder; a killed run's lock is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_nst.core import files
from lightning_nst.core.errors import NSTError
from lightning_nst.core.files import FOLDER_LOCK, FolderLock


def test_a_held_folder_is_refused_naming_its_owner_and_freed_on_release(tmp_path: Path) -> None:
    first = FolderLock(tmp_path, "out", "grid a")
    first.acquire()
    with pytest.raises(NSTError) as refused:
        FolderLock(tmp_path, "out", "grid b").acquire()
    line = str(refused.value)
    assert line.startswith(f"out: {tmp_path} is being written by another run (process {os.getpid()} on ")
    assert "with other settings" in line and "\n" not in line
    with pytest.raises(NSTError, match="with the same settings"):
        FolderLock(tmp_path, "out", "grid a").acquire()
    first.release()
    assert not (tmp_path / FOLDER_LOCK).exists()
    second = FolderLock(tmp_path, "out", "grid b")
    second.acquire()  # free again
    second.release()


def test_the_lock_of_a_process_that_died_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / FOLDER_LOCK).write_text(json.dumps({"token": "x", "host": os.uname().nodename, "pid": pid}))
    lock = FolderLock(tmp_path, "out")
    lock.acquire()
    assert json.loads((tmp_path / FOLDER_LOCK).read_text())["pid"] == os.getpid()
    assert [path.name for path in tmp_path.iterdir()] == [FOLDER_LOCK]  # the stale one is gone, nothing else left
    lock.release()


def test_another_hosts_lock_is_stale_once_its_heartbeat_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "HEARTBEAT_S", 0.05)
    path = tmp_path / FOLDER_LOCK
    path.write_text(json.dumps({"token": "x", "host": "another-host", "pid": 1}))
    with pytest.raises(NSTError, match="process 1 on another-host"):
        FolderLock(tmp_path, "out").acquire()  # just touched: alive
    time.sleep(0.3)  # more than 4 heartbeats without a touch
    lock = FolderLock(tmp_path, "out")
    lock.acquire()
    lock.release()


def test_a_run_never_removes_a_lock_it_does_not_hold(tmp_path: Path) -> None:
    lock = FolderLock(tmp_path, "out")
    lock.acquire()
    lock.release()
    other = {"token": "someone else", "host": "another-host", "pid": 1}
    (tmp_path / FOLDER_LOCK).write_text(json.dumps(other))
    lock.release()
    assert json.loads((tmp_path / FOLDER_LOCK).read_text()) == other


def test_a_file_of_the_locks_name_that_is_no_lock_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "HEARTBEAT_S", 0.01)
    path = tmp_path / FOLDER_LOCK
    path.write_text("my notes")
    time.sleep(0.1)  # old enough to pass for a stale, half-written lock
    with pytest.raises(NSTError, match="is not a lock lightning-nst wrote; move it away"):
        FolderLock(tmp_path, "out").acquire()
    assert path.read_text() == "my notes" and sorted(p.name for p in tmp_path.iterdir()) == [FOLDER_LOCK]
