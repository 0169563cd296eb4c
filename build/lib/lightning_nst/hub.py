"""Names of pretrained models on the Hugging Face Hub, kept apart from the modules that load them.

Importing :mod:`lightning_nst.diffusion` imports diffusers and transformers (about a second); the report and the
CLI's help only need the name.
"""

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
"""The Stable Diffusion pipeline used when none is given: Stable Diffusion 1.5, as in the shipped configs."""
