"""The NST wing: image optimisation as a Lightning fit whose parameter is the image.

Content reconstruction, texture synthesis and Gatys style transfer (:class:`~lightning_nst.ImageOptimization`),
their targets (:mod:`~lightning_nst.nst.data`), results writer, checkpoints, coarse-to-fine scales and tiling. It
never imports diffusers, transformers or the diffusion wing.
"""
