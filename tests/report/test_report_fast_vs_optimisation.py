"""`lightning-nst report fast_vs_optimisation` at toy size: a trained network against optimisation."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.report.test_report import assert_figure, assert_finite, report, tables

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fast_vs_optimisation_trains_stylizes_and_scores_both(tmp_path: Path) -> None:
    out = report("fast_vs_optimisation", "--train_steps=3", "--train_size=32", "--held_out=[sample:coffee]")
    [(caption, rows)] = tables(out / "report.md")
    assert [row["method"] for row in rows] == ["photo itself", "network", "optimisation (6 steps)"]
    assert all(row["photo"] == "sample:coffee" for row in rows)
    for row in rows:
        assert_finite(row["style loss"], row["content loss"])
    assert float(rows[0]["content loss"]) == 0  # the photo against itself
    assert float(rows[1]["seconds"]) > 0 and float(rows[2]["seconds"]) > 0
    assert "The network's training took" in caption
    # The held-out photo is not among the photos the network trained on.
    trained_on = sorted(path.stem for path in (out / "train_photos").glob("*.jpg"))
    assert trained_on and "coffee" not in trained_on and not any(name.startswith("mask") for name in trained_on)
    assert (out / "runs" / "network" / "checkpoints" / "last.ckpt").is_file()
    assert_figure(out / "fast_vs_optimisation.png")
