"""The core both wings stand on: images, files, VGG19 features, style statistics and losses, colour, metrics.

Torch only: nothing here imports Lightning, diffusers or transformers, or either wing.
"""
