"""Fast style networks: feed-forward stylizers trained once with the wing's VGG losses, then run in one pass.

The networks themselves (:mod:`~lightning_nst.nst.fast.networks`: Johnson et al.'s per-style transformer and
Huang and Belongie's AdaIN for any style), their training as ordinary Lightning jobs
(:mod:`~lightning_nst.nst.fast.training`) over image folders (:mod:`~lightning_nst.nst.fast.data`), and their use
(:mod:`~lightning_nst.nst.fast.inference`: checkpoints, folders, TorchScript export).
"""
