"""The NST wing: image optimisation as a Lightning fit whose parameter is the image.

Content reconstruction, texture synthesis and Gatys style transfer (:class:`~lightning_nst.ImageOptimization` in
:mod:`~lightning_nst.nst.module`), what an objective is (:mod:`~lightning_nst.nst.objective`), its whole or tiled
evaluation (:mod:`~lightning_nst.nst.evaluator`, :mod:`~lightning_nst.nst.tiling`), the optimizers
(:mod:`~lightning_nst.nst.optimizers`), coarse-to-fine scales (:mod:`~lightning_nst.nst.scales`), best images and
results (:mod:`~lightning_nst.nst.results`), their targets (:mod:`~lightning_nst.nst.data`), the results writer
(:mod:`~lightning_nst.nst.writer`, :mod:`~lightning_nst.nst.summary`) and checkpoints
(:mod:`~lightning_nst.nst.checkpoint`). It never imports diffusers, transformers or the diffusion wing.
"""
