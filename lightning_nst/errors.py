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
