"""The exceptions whose message is shown to users without a traceback."""

from __future__ import annotations


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
