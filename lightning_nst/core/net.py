"""Whether a download host answers: asked before a download, so that offline a run falls back or fails at once."""

from __future__ import annotations

import socket
import urllib.parse


def unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why ``url``'s host cannot be reached (no name lookup, no connection within ``timeout`` s), or ``None``.

    The downloaders' own answer to a missing network comes late: torch's hub prints "Downloading: ..." first, and
    huggingface_hub retries a failed request with back-off for about 23 s before it gives up.
    """
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return None
    except OSError as error:
        return str(error.strerror or error)
