"""The names of the style statistics, colour modes and image parameterisations, without importing torch.

:mod:`lightning_nst.core.losses`, :mod:`lightning_nst.core.color` and :mod:`lightning_nst.nst.parameterization`
implement them; the command line offers them (``lightning-nst stylize --help``) before a run imports torch.
"""

from __future__ import annotations

STATISTICS: tuple[str, ...] = ("gram", "meanvar", "w2", "sliced_w")
"""The style statistics of :class:`~lightning_nst.core.losses.StyleLoss`."""

COLOR_MODES: tuple[str, ...] = ("keep", "luminance", "match", "histogram")
"""The colour controls of :mod:`lightning_nst.core.color` (``Objective.color``)."""

PARAMETERIZATIONS: tuple[str, ...] = ("pixels", "laplacian", "fourier")
"""What an image optimisation moves (:mod:`lightning_nst.nst.parameterization`, ``model.parameterization``)."""
