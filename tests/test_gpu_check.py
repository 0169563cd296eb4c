"""benchmarks/gpu_check.py, the check to run on a GPU, kept from rotting: its smoke mode, its plan, its budget."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SIZES = (32, 48)  # the smoke mode's NST sizes
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def nst_rows(sizes: tuple[int, ...]) -> list[str]:
    rows = []
    for size in sizes:
        rows += [f"NST {size} px {p} {layout} Adam" for p in PRECISIONS for layout in ("channels_last", "NCHW")]
        rows.append(f"NST {size} px 32-true channels_last L-BFGS")
    return rows


def expected_rows(sizes: tuple[int, ...], ttq_size: int, guidance_size: int) -> list[str]:
    return [
        *nst_rows(sizes),
        f"tutorial loss {ttq_size} px: reference (tutorial L-BFGS)",
        f"tutorial loss {ttq_size} px: ours (stylize recipe, L-BFGS)",
        f"tutorial loss {ttq_size} px: ours (stylize recipe, L-BFGS bf16-mixed)",
        "SD 1.5 UNet forward (CFG batch 2)",
        "SD 1.5 VAE decoder fwd+bwd",
        "tiny decoder (AutoencoderTiny) fwd+bwd",
        f"VGG style loss fwd+bwd at {guidance_size} px",
        "whole guided step, VAE decoder",
        "whole guided step, tiny decoder",
    ]


def run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU paths, on any machine
    return subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def table(stdout: str) -> dict[str, list[str]]:
    """Row name -> the other cells, from the markdown table the script prints."""
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("row", "planned row"):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow  # about 30 s on a busy 2-core CPU: 17 Lightning fits and the guided-step parts
def test_smoke_runs_every_row_on_the_cpu_with_finite_figures(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.md"
    result = run("--smoke", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table(result.stdout)
    assert list(rows) == expected_rows(SIZES, 32, 32)
    for name, (measure, seconds, peak, note) in rows.items():
        assert measure in ("s/step", "s to target", "s/call"), name
        assert math.isfinite(float(seconds)) and float(seconds) > 0, (name, seconds, note)
        assert peak == "n/a", name  # no CUDA: no device memory to report
    assert "steps" in rows["tutorial loss 32 px: ours (stylize recipe, L-BFGS)"][3]
    assert out.read_text() in result.stdout


def test_the_real_plan_has_every_row_and_fits_the_default_budget() -> None:
    result = run("--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table(result.stdout)
    assert list(rows) == expected_rows((512, 1024), 512, 256)
    total = float(result.stdout.split("total at most ")[1].split()[0])
    assert 0 < total <= 480


def test_rows_over_the_budget_are_skipped_saying_so() -> None:
    result = run("--smoke", "--budget-s", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table(result.stdout)
    assert list(rows) == expected_rows(SIZES, 32, 32)
    assert all(cells[1] == "-" and cells[3] == "skipped: budget" for cells in rows.values())


@pytest.mark.slow  # a fresh process for one message
def test_without_cuda_the_real_check_refuses_pointing_at_smoke() -> None:
    result = run()
    assert result.returncode != 0
    assert "--smoke" in result.stderr
