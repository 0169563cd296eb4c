"""The exceptions whose message is shown to users without a traceback."""

from __future__ import annotations

import re
import sys


class NSTError(Exception):
    """Bad input named by file or config key; the CLI prints it as a single line and exits with status 2."""

    @classmethod
    def behind(cls, error: BaseException) -> NSTError | None:
        """The NSTError ``error`` is or was raised from, if any.

        jsonargparse instantiates config classes inside handlers that catch every exception and raise another one
        (a ``ValueError`` quoting it, for a ``Union``) ``from`` it, so an NSTError raised in an ``__init__`` is found
        down the ``__cause__``/``__context__`` chain.
        """
        seen: set[int] = set()
        current: BaseException | None = error
        while current is not None and id(current) not in seen:
            if isinstance(current, NSTError):
                return current
            seen.add(id(current))
            current = current.__cause__ or current.__context__
        return None


class StoppedBySignal(Exception):
    """A run stopped by SIGINT or SIGTERM after keeping what was done; ``message`` says how to resume."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.message = message

    @property
    def exit_code(self) -> int:
        """The shell's status for death by this signal: ``128 + signum``."""
        return 128 + self.signum


class DivergenceError(NSTError):
    """A loss term became non-finite: the message names the step, the objective and the term.

    Whoever saves the last finite images (:class:`lightning_nst.nst.writer.ImageWriter`, in its ``on_exception``)
    records where with :meth:`kept`, and the message says so.
    """

    def __init__(self, step: int, objective: str, term: str, value: float) -> None:
        self.step, self.objective, self.term, self.value = step, objective, term, value
        self.kept_note = ""
        super().__init__(str(self))

    def kept(self, folder: str | None) -> None:
        """Say that the last finite images are in ``folder`` as ``*.last_good.png``; ``None``: none was finite."""
        if folder is None:
            self.kept_note = "; no image was ever finite, so no *.last_good.png was written"
        else:
            self.kept_note = f"; the last finite images are in {folder} as *.last_good.png"

    def __str__(self) -> str:
        return (
            f"step {self.step}: objective {self.objective}, loss term {self.term} is {self.value}; "
            f"lower the learning rate (model.optimizer) or the weights (model.objectives){self.kept_note}"
        )


_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*")
_GLOO_TRANSPORT = re.compile(r"^\[[^\]]*gloo/transport/[^\]]*\]")


def lost_peer(error: BaseException) -> str | None:
    """What ``error`` says of the lost peer, if it is torch.distributed's failure of a collective whose peer is gone.

    That is a ``DistError`` (a collective's backend failing, or the run's store gone with the process that held it:
    ``Failed to recv, got 0 bytes``), or the ``RuntimeError`` Gloo's transport raises (``[.../gloo/transport/tcp/
    pair.cc:561] Connection closed by peer [10.0.0.2]:41234. ...``); its first sentence is kept, without the source
    file. The wait for peers to meet, which raises the same kinds, is reported apart (:mod:`lightning_nst.cli.
    rendezvous`).
    """
    distributed = sys.modules.get("torch.distributed")
    dist_error = getattr(distributed, "DistError", None)
    text = str(error).strip()
    gloo = isinstance(error, RuntimeError) and _GLOO_TRANSPORT.match(text) is not None
    if not gloo and (dist_error is None or not isinstance(error, dist_error)):
        return None
    first = _SOURCE_PREFIX.sub("", text.splitlines()[0] if text else "")
    return first.split(". ", 1)[0].rstrip(".") or type(error).__name__
