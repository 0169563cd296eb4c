"""The names of the style statistics and colour modes, without importing torch.

:mod:`lightning_nst.core.losses` and :mod:`lightning_nst.core.color` implement them; the command line offers them
(``lightning-nst stylize --help``) before a run imports torch.
"""

from __future__ import annotations

STATISTICS: tuple[str, ...] = ("gram", "meanvar", "w2", "sliced_w")
"""The style statistics of :class:`~lightning_nst.core.losses.StyleLoss`."""

COLOR_MODES: tuple[str, ...] = ("keep", "luminance", "match", "histogram")
"""The colour controls of :mod:`lightning_nst.core.color` (``Objective.color``)."""
