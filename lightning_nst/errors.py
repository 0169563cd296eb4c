"""The one exception type whose message is shown to users without a traceback."""


class NSTError(ValueError):
    """Bad input named by file or config key; the CLI prints it as a single line and exits with status 2."""
