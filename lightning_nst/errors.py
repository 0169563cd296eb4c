"""The one exception type whose message is shown to users without a traceback."""

from __future__ import annotations

from typing import ClassVar


class NSTError(Exception):
    """Bad input named by file or config key; the CLI prints it as a single line and exits with status 2."""

    raised: ClassVar[list[NSTError]] = []

    def __init__(self, message: str) -> None:
        super().__init__(message)
        # jsonargparse instantiates config classes inside Union branches that catch every exception and raise a
        # multi-line ValueError quoting it; the CLI finds the original here to show the one line that matters.
        NSTError.raised.append(self)

    @classmethod
    def behind(cls, error: BaseException) -> NSTError | None:
        """The most recent NSTError whose message ``error`` quotes, if any."""
        text = str(error)
        return next((candidate for candidate in reversed(cls.raised) if str(candidate) in text), None)
