"""``python -m lightning_nst``."""

from lightning_nst.main import main

main()
