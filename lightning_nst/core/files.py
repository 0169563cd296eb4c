"""Output folders and input identity: checks made before any heavy work, and content hashes of files."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_nst.core.errors import NSTError

MIN_FREE_BYTES = 64 * 2**20
"""Free space an output folder's disk must have before a run starts: enough for its images and checkpoints."""


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_digest(source: str | os.PathLike[str]) -> str:
    """What identifies an image source's content: the SHA-256 of a file, or the name of an embedded sample.

    A file edited in place gets a new digest, so results made from its old content are not mistaken for current.
    Samples (``sample:NAME`` shipped in this package, ``skimage:NAME`` in scikit-image) come with an installed
    package and are identified by name.
    """
    text = str(source)
    if text.startswith(("sample:", "skimage:")):  # images.SAMPLE_PREFIXES; outputs.py sits below images.py
        return text
    return file_digest(Path(text).expanduser())


def check_input_file(path: str | os.PathLike[str], key: str, what: str = "file") -> Path:
    """Return ``path`` if it is a regular file (or a link to one); else raise saying what it is instead.

    Only ``stat`` is used: a FIFO or device is never opened, since reading one could block forever.
    """
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise NSTError(f"{key}: {what} not found: {path}") from None
    except OSError as error:
        raise NSTError(f"{key}: cannot read {path}: {error.strerror or error}") from None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        raise NSTError(f"{key}: {path} is a folder, not a file")
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    raise NSTError(f"{key}: {path} is {kind}, not a regular file")


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def check_output_dir(path: str | os.PathLike[str], key: str, *, min_free: int = MIN_FREE_BYTES) -> Path:
    """Raise naming ``key`` unless ``path`` is, or can become, a writable folder on a disk with ``min_free`` bytes.

    Nothing is created: the nearest existing ancestor is probed with a temporary file that is removed at once, so a
    run that fails later leaves no folder behind. Probing, rather than ``os.access``, also catches read-only mounts
    and holds for root, for whom permission bits do not stop writes.
    """
    path = Path(path).expanduser()
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        what = "is not a folder" if ancestor == path else f"cannot be created: {ancestor} is not a folder"
        raise NSTError(f"{key}: {path} {what}")
    try:
        handle, probe = tempfile.mkstemp(prefix=".lightning-nst-probe.", dir=ancestor)
    except OSError as error:
        reason = "it is read-only" if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else error.strerror
        where = "" if ancestor == path else f" (in {ancestor})"
        raise NSTError(f"{key}: cannot write to {path}{where}: {reason}") from None
    os.close(handle)
    os.unlink(probe)
    free = shutil.disk_usage(ancestor).free
    if free < min_free:
        raise NSTError(
            f"{key}: the disk holding {path} has only {free / 2**20:.1f} MiB free; a run needs at least "
            f"{min_free / 2**20:.0f} MiB"
        )
    return path


def write_atomic(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` through a temporary file and a rename, so readers never see half a file.

    Raises:
        NSTError: If ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise NSTError(f"refusing to overwrite existing output {path}")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())  # the bytes reach the disk before the name does
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


FILES_RECORD = ".lightning-nst-files.jsonl"
"""The record of the files lightning_nst wrote into a folder: one JSON line ``{"file", "sha256"}`` per write."""


class OutputFolder:
    """A folder lightning_nst writes into, and the one rule for every file it writes there.

    A file is written where no file of its name exists, or where the existing file is one lightning_nst wrote into
    this folder: its current bytes are bytes a record of the folder holds for that name. Anything else, a file of the
    user's or one changed since it was written, is refused naming it, unless ``overwrite``. The record is
    :data:`FILES_RECORD`, to which :meth:`write` appends each file's digest before the file itself is written, so a
    file whose write a kill interrupted is still recognised as the folder's own; a batch of generated items passes
    its manifest's digests instead (:meth:`foreign`'s ``recorded``). Under several processes, each appends whole
    lines in single writes (``O_APPEND``), so their records do not mix.

    Args:
        directory: The folder (it need not exist yet).
        key: The config key or flag that names the folder, for errors.
    """

    def __init__(self, directory: str | os.PathLike[str], key: str) -> None:
        self.directory = Path(directory)
        self.key = key

    def recorded(self) -> dict[str, set[str]]:
        """The digests :data:`FILES_RECORD` holds for each file name (relative to the folder)."""
        record = self.directory / FILES_RECORD
        if not record.is_file():
            return {}
        digests: dict[str, set[str]] = {}
        for line in record.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line a killed process left half-written
            if isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str):
                digests.setdefault(entry["file"], set()).add(entry["sha256"])
        return digests

    def foreign(self, names: Iterable[str], recorded: Mapping[str, Collection[str]] | None = None) -> list[str]:
        """The ``names`` that exist in the folder but are not files lightning_nst wrote there (see the class).

        Args:
            names: File names relative to the folder.
            recorded: The digests known for each name; by default those of :data:`FILES_RECORD`.
        """
        recorded = self.recorded() if recorded is None else recorded
        found = []
        for name in names:
            path = self.directory / name
            if not os.path.lexists(path):
                continue
            if path.is_symlink() or not path.is_file() or file_digest(path) not in recorded.get(name, ()):
                found.append(name)
        return found

    def refusal(self, names: Sequence[str], why: str = "", hint: str = "") -> NSTError:
        """The one-line error for the foreign files ``names``: the first named, the others counted."""
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        why = why or "is not a file lightning-nst wrote there"
        hint = hint or "move it away, or allow replacing it with overwrite"
        return NSTError(f"{self.key}: {self.directory / names[0]}{more} {why}; {hint}")

    def check(self, names: Iterable[str], *, overwrite: bool = False, hint: str = "") -> None:
        """Raise :meth:`refusal` unless every existing one of ``names`` is the folder's own (or ``overwrite``)."""
        if overwrite:
            return
        found = self.foreign(names)
        if found:
            raise self.refusal(found, hint=hint)

    def record(self, name: str, digest: str) -> None:
        """Append ``name`` with the ``digest`` of the bytes about to be written to :data:`FILES_RECORD`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({"file": name, "sha256": digest}) + "\n").encode("utf-8")
        handle = os.open(self.directory / FILES_RECORD, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            os.write(handle, line)
            os.fsync(handle)
        finally:
            os.close(handle)

    def write(self, name: str, data: bytes, *, overwrite: bool = False, hint: str = "") -> Path:
        """Write ``data`` as ``name`` atomically, if the rule allows (see the class); record it first."""
        self.check([name], overwrite=overwrite, hint=hint)
        self.record(name, hashlib.sha256(data).hexdigest())
        return write_atomic(self.directory / name, data, overwrite=True)


def checkpoint_run_folder(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The run folder a checkpoint lies in as ``<run>/checkpoints/NAME.ckpt``, or ``None``.

    A run folder of lightning_nst or Lightning: it holds the run's ``config.yaml`` or ``hparams.yaml``.
    """
    path = Path(checkpoint).expanduser()
    folder = path.parent.parent
    if path.parent.name != "checkpoints":
        return None
    if not (folder / "config.yaml").is_file() and not (folder / "hparams.yaml").is_file():
        return None
    return folder


FOLDER_LOCK = ".lightning-nst.lock"
"""The file by which one run owns an output folder while it writes there (:class:`FolderLock`)."""

HEARTBEAT_S = 20.0
"""How often a lock's owner touches it; a lock of another host untouched for 4 times that is stale."""


class FolderLock:
    """One run at a time writes into a folder: ``<folder>/.lightning-nst.lock``, created exclusively.

    The lock holds its owner's host, process id and start time, and its owner touches it every :data:`HEARTBEAT_S`
    seconds. A lock whose owner is gone is stale and taken over: on this host, a process id that no longer runs; on
    another (a shared filesystem), a lock untouched for 4 heartbeats. So a killed run never leaves a folder stuck.

    Args:
        directory: The folder.
        key: The config key or flag that names it, for errors.
        what: What the owner runs, said to a run the lock refuses (e.g. the settings' fingerprint).
    """

    def __init__(self, directory: str | os.PathLike[str], key: str, what: str = "") -> None:
        self.path = Path(directory) / FOLDER_LOCK
        self.key = key
        self.what = what
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._created: list[Path] = []

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is not None and holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder.get("pid", -1)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, OverflowError):
                return False
            return False
        # Another host's lock, or an unreadable one (half-written by a process killed while creating it): its age.
        try:
            return time.time() - self.path.stat().st_mtime > 4 * HEARTBEAT_S
        except FileNotFoundError:
            return True

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise one line naming the folder's owner if it is held."""
        folder = self.path.parent
        self._created = list(itertools.takewhile(lambda path: not path.exists(), (folder, *folder.parents)))
        folder.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S"), "what": self.what})  # fmt: skip
        for _ in range(3):
            try:
                handle = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = self._read(self.path)
                if not self._stale(holder):
                    raise self._refusal(holder) from None
                # Renamed aside first: of two runs taking over the same stale lock, one rename fails.
                aside = self.path.with_name(f"{FOLDER_LOCK}.stale.{os.getpid()}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                if aside.read_bytes().strip() and "token" not in (self._read(aside) or {}):
                    os.rename(aside, self.path)  # not a lock this program wrote: the user's file stays, named as it was
                    raise NSTError(f"{self.key}: {self.path} is not a lock lightning-nst wrote; move it away") from None
                aside.unlink()  # a lock a lightning-nst run wrote (or began to) and can no longer release
                continue
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(record)
                stream.flush()
                os.fsync(stream.fileno())
            self._beat = threading.Thread(target=self._heartbeat, name="lightning-nst folder lock", daemon=True)
            self._beat.start()
            return
        raise self._refusal(self._read(self.path))

    def _refusal(self, holder: dict[str, Any] | None) -> NSTError:
        if holder is None:
            owner = "another run (its lock file is being written)"
        else:
            owner = f"another run (process {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"
            same = holder.get("what") == self.what and self.what
            owner += ", with the same settings)" if same else ", with other settings)" if self.what else ")"
        return NSTError(
            f"{self.key}: {self.path.parent} is being written by {owner}; wait for it to finish, or stop it and run "
            f"again (a stopped or killed run's lock {self.path.name} is taken over)"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Stop touching the lock and remove it, if it is still this run's."""
        self._stop.set()
        holder = self._read(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        for folder in self._created:  # deepest first: the folders acquire made, if the run left them empty
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []
