"""lightning_nst.outputs: output folder checks that create nothing, input file checks that open nothing, digests."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import pytest

import lightning_nst.outputs as outputs
from lightning_nst.errors import NSTError
from lightning_nst.outputs import check_input_file, check_output_dir, file_digest, source_digest


def test_a_missing_folder_is_accepted_but_not_created(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    assert check_output_dir(target, "key") == target
    assert not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == [], "the write probe was left behind"


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(NSTError, match=r"^key: .*/f is not a folder$"):
        check_output_dir(tmp_path / "f", "key")
    with pytest.raises(NSTError, match=r"^key: .*/f/sub cannot be created: .*/f is not a folder$"):
        check_output_dir(tmp_path / "f" / "sub", "key")


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EPERM])
def test_read_only(code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(outputs.tempfile, "mkstemp", refuse)
    with pytest.raises(NSTError, match=r"^key: cannot write to .*/out \(in .*\): it is read-only$"):
        check_output_dir(tmp_path / "out", "key")


def test_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10 * 2**20))
    with pytest.raises(NSTError, match=r"has only 10\.0 MiB free; a run needs at least 64 MiB"):
        check_output_dir(tmp_path, "key")
    assert check_output_dir(tmp_path, "key", min_free=2**20) == tmp_path


def test_input_file_kinds(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert check_input_file(tmp_path / "link", "k") == tmp_path / "link"
    with pytest.raises(NSTError, match=r"^k: image file not found: .*/missing$"):
        check_input_file(tmp_path / "missing", "k", "image file")
    with pytest.raises(NSTError, match=r"^k: weights file not found: .*/dangling$"):
        check_input_file(tmp_path / "dangling", "k", "weights file")
    with pytest.raises(NSTError, match=r"^k: .*/folder is a folder, not a file$"):
        check_input_file(tmp_path / "folder", "k")
    with pytest.raises(NSTError, match=r"^k: .*/fifo is a FIFO, not a regular file$"):
        check_input_file(tmp_path / "fifo", "k")  # returns at once: the FIFO is never opened
    with pytest.raises(NSTError, match="is a device, not a regular file"):
        check_input_file("/dev/null", "k")


def test_digests(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"pixels")
    assert file_digest(tmp_path / "f") == hashlib.sha256(b"pixels").hexdigest()
    assert source_digest(tmp_path / "f") == file_digest(tmp_path / "f")
    assert source_digest("skimage:astronaut") == "skimage:astronaut"
