"""``python -m lightning_nst``."""

from lightning_nst.cli import main

main()
