"""`lightning-nst report style_controls` at toy size: its runs, tables, figures and bad settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_nst.report.experiments.measures import loss_seconds
from tests.report.test_report import assert_figure, assert_finite, report, tables

pytestmark = pytest.mark.usefixtures("one_thread")

STATISTICS = ["gram", "meanvar", "w2", "sliced_w"]


def test_style_controls_runs_measures_and_claims(capsys: pytest.CaptureFixture[str]) -> None:
    out = report("style_controls", "--blend_weights=[0, 0.5, 1]", "--timing_repeats=2")
    progress = re.findall(r"^\[style_controls\] run \d+/(\d+): (\S+) \(ETA", capsys.readouterr().out, re.M)
    assert progress == [("6", run) for run in ("colour", "blend_1", "blend_0.5", "blend_0", "mask", "textures")]
    [(_, colour), (_, distances), (_, regions), (_, textures), (caption, timing)] = tables(out / "report.md")
    assert [row["image"] for row in colour] == ["style A", "keep", "luminance", "match", "histogram"]
    results = ["keep", "luminance", "match", "histogram", "blend 1", "blend 0.5", "blend 0", "mask"]
    assert [row["result"] for row in distances] == results
    assert [(row["region"].split("'")[0], row["statistic"]) for row in regions] == [
        (style, statistic) for style in ("A", "B") for statistic in STATISTICS
    ]
    assert [row["objective"] for row in textures] == STATISTICS
    assert [row["statistic"] for row in timing] == STATISTICS and "2 rounds" in caption
    for row in colour:
        assert_finite(row["CbCr difference"], row["RGB mean gap"])
    for row in distances:
        assert_finite(*(row[f"{statistic} → {style}"] for statistic in STATISTICS for style in "AB"))
    # blend 1 is style A alone: the same run as keep, so the same distances (sliced_w's projections reseeded).
    keep, alone = distances[0], distances[4]
    assert {key: keep[key] for key in keep if key != "result"} == {key: alone[key] for key in alone if key != "result"}
    for row in regions:
        assert_finite(row["to its own style"], row["to the other style"])
        closer = float(row["to its own style"]) < float(row["to the other style"])
        assert row["closer to its own"] == ("yes" if closer else "no")
    for row in textures:
        assert_finite(row["initial loss"], row["final loss"], *(row[f"{s} distance to texture"] for s in STATISTICS))
        assert float(row["fall (initial/final)"]) > 1
    for row in timing:
        low, q1, median, q3, high = (float(row[key]) for key in ("min", "Q1", "median s", "Q3", "max"))
        assert 0 < low <= q1 <= median <= q3 <= high
    text = (out / "report.md").read_text()
    luminance, keep_chroma = float(colour[2]["CbCr difference"]), float(colour[1]["CbCr difference"])
    verdict = "holds" if luminance < keep_chroma else "does not hold"
    assert "Luminance keeps the content's chroma better than keep: CbCr difference" in text
    assert re.search(rf"better than keep: .* → \*\*{verdict}\*\*", text)
    closer = sum(row["closer to its own"] == "yes" for row in regions)
    assert f"closer to its own style than to the other: holds on **{closer} of 8** cases" in text
    assert re.search(r"moves monotonically .* holds on \*\*\d of 8\*\* cases", text)
    assert re.search(r"loss falls at least 10×: .* holds on \*\*\d of 4\*\* cases", text)
    for figure in ("colour_modes.png", "blend_sweep.png", "mask.png", "textures.png"):
        assert_figure(out / figure)
    assert len(list((out / "configs").glob("*.yaml"))) == 6


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--second_style=skimage:immunohistochemistry"], "second_style: must be another image than style"),
        (["--blend_weights=[0.5]"], "blend_weights: give at least two"),
        (["--blend_weights=[0, 1.5]"], "blend_weights: each must be in [0, 1]"),
        (["--blend_weights=[0, .nan]"], "blend_weights: each must be in [0, 1]"),
        (["--blend_weights=[0.5, 0.5]"], "blend_weights: each weight once"),
        (["--masks=[sample:mask_left]"], "masks: give two mask images"),
        (["--masks=[sample:mask_left, missing.png]"], "masks[1]"),
        (["--second_style=missing.png"], "second_style"),
    ],
)
def test_style_controls_bad_settings_are_one_line_before_any_run(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as error:
        report("style_controls", *args)
    assert error.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("lightning-nst: error:") and expected in message and "\n" not in message
    assert not Path("reports/style_controls").exists()


def test_a_mask_of_another_shape_than_the_content_is_refused_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    Image.new("L", (64, 16), 255).save("wide.png")
    with pytest.raises(SystemExit) as error:
        report("style_controls", "--masks=[wide.png, sample:mask_right]")
    assert error.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "masks[0]: wide.png" in message and "\n" not in message
    assert not Path("reports/style_controls").exists()


def test_interleaved_timing_rotates_which_statistic_goes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []

    class Loss(torch.nn.Module):
        def __init__(self, targets: dict, statistic: str) -> None:
            super().__init__()
            self.statistic = statistic

        def forward(self, features: dict) -> torch.Tensor:
            order.append(self.statistic)
            return sum(value.sum() for value in features.values())

    class Features(torch.nn.Module):
        mean = torch.zeros(1)

        def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"relu1_1": image * 2}

    class Fake:
        features = Features()

    monkeypatch.setattr("lightning_nst.report.experiments.measures.LayerStyleLoss", Loss)
    times = loss_seconds(Fake(), ["relu1_1"], 4, 2, ["gram", "meanvar", "w2"])  # type: ignore[arg-type]
    assert order == ["gram", "meanvar", "w2", "meanvar", "w2", "gram", "w2", "gram", "meanvar"]
    assert {statistic: len(values) for statistic, values in times.items()} == {"gram": 2, "meanvar": 2, "w2": 2}
    order.clear()
    loss_seconds(Fake(), ["relu1_1"], 4, 2)  # type: ignore[arg-type]
    assert order == ["gram", "meanvar", "meanvar", "gram", "gram", "meanvar"]  # gram_vs_meanvar's order, as before
