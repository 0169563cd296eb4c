"""Error and cost of the W2 style loss's cross term tr((Σ_s^1/2 Σ Σ_s^1/2)^1/2), per way of computing it.

    python benchmarks/w2_fidelity.py --weights ../shared/models/vgg19_imagenet_conv1_1-conv3_1.pth --size 128

Not a test. Ways: coupled Newton-Schulz with 20 (the loss up to this version), 30 and 40 iterations, in the
features' dtype, and the eigenvalues of Σ_s^1/2 Σ Σ_s^1/2 in float64 (``eigh``, the loss's way now). For each VGG
layer (relu1_1, relu2_1, relu3_1), with gravel at ``--size`` px as the texture: the relative error of each way's
loss against a float64 reference computed by numpy (float64 features, ``numpy.linalg.eigvalsh``), at the noise
start and at a synthesis taken near convergence (L-BFGS on the reference-exact loss), float32 features as a fit
has them, then the same from float64 sums as the tiled path has them. Then the seconds per loss evaluation
(forward and backward) of each way on covariances of 64 to 512 channels, the ways alternated in one run (median of
``--repeats``), so that the ratios hold on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_nst.core.images import load_image
from lightning_nst.core.vgg import VGG19Features
from lightning_nst.core.wasserstein import W2_EPS, sqrtm_eigh, w2_cross_trace, weighted_mean_cov

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.core.test_losses_wasserstein import w2_float64  # noqa: E402  (the one float64 reference)

LAYERS = ("relu1_1", "relu2_1", "relu3_1")


# The loss's way up to this version, after crowsonkb/style-transfer-pytorch's sqrtm_ns_lyap.
def sqrtm_newton_schulz(a: Tensor, iterations: int) -> Tensor:
    """Square roots of ``(..., C, C)`` symmetric positive (semi)definite matrices by coupled Newton-Schulz."""
    norm = a.square().sum(dim=(-2, -1), keepdim=True).sqrt()
    y = a / norm
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    z = eye.expand_as(a)
    for _ in range(iterations):
        t = (3 * eye - z @ y) / 2
        y, z = y @ t, t @ z
    return y * norm.sqrt()


class SqrtmNewtonSchulz(torch.autograd.Function):
    """Matrix square root with a Newton-Schulz backward that solves the Lyapunov equation of its gradient.

    Follows ``sqrtm_ns_lyap`` of crowsonkb/style-transfer-pytorch (from msubhransu/matrix-sqrt, Lin and Maji 2017):
    differentiating through the iterations would keep every iterate for backward. torch has no matrix square root,
    and one through ``torch.linalg.eigh`` has gradients that divide by eigenvalue gaps, unstable for the repeated
    near-zero eigenvalues of rank-deficient feature covariances.
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, iterations: int) -> Tensor:  # noqa: D102
        root = sqrtm_newton_schulz(a, iterations)
        ctx.save_for_backward(root)
        ctx.iterations = iterations
        return root

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        (root,) = ctx.saved_tensors
        norm = root.square().sum(dim=(-2, -1), keepdim=True).sqrt()
        a = root / norm
        eye3 = 3 * torch.eye(root.shape[-1], dtype=root.dtype, device=root.device)
        q = grad / norm
        for i in range(ctx.iterations):
            eye_a_a = eye3 - a @ a
            q = (q @ eye_a_a - a.transpose(-2, -1) @ (a.transpose(-2, -1) @ q - q @ a)) / 2
            if i < ctx.iterations - 1:
                a = a @ eye_a_a / 2
        return q / 2, None


def newton_schulz(iterations: int) -> Callable[[Tensor, Tensor], Tensor]:
    """The cross trace by Newton-Schulz in the covariance's dtype."""

    def cross(root: Tensor, cov: Tensor) -> Tensor:
        return SqrtmNewtonSchulz.apply(root @ cov @ root, iterations).diagonal(dim1=-2, dim2=-1).sum(-1)

    return cross


WAYS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "ns20": newton_schulz(20),
    "ns30": newton_schulz(30),
    "ns40": newton_schulz(40),
    "eigh": w2_cross_trace,
}


def w2(way: Callable[[Tensor, Tensor], Tensor], mean: Tensor, cov: Tensor, target: tuple[Tensor, Tensor, Tensor]):
    """The loss of ``(mean, cov)`` against ``(mean, cov + eps I, its root)`` with the cross trace by ``way``."""
    t_mean, t_cov, t_root = target
    cov = cov + W2_EPS * torch.eye(cov.shape[-1], dtype=cov.dtype)
    cross = way(t_root.to(cov.dtype), cov)
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1).double() + t_cov.double().trace() - 2 * cross.double()
    return ((mean - t_mean.to(mean.dtype)).square().sum(-1).double() + trace) / cov.shape[-1]


def target_of(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    mean, cov = weighted_mean_cov(features.float().flatten(2), None, diagonal=False)
    cov = cov[0] + W2_EPS * torch.eye(cov.shape[-1])
    return mean[0], cov, sqrtm_eigh(cov)


def errors(vgg: VGG19Features, image: Tensor, texture: Tensor, label: str) -> None:
    with torch.no_grad():
        feats, targets = vgg(image), vgg(texture)
    for layer in LAYERS:
        exact, target = w2_float64(feats[layer], targets[layer]), target_of(targets[layer])
        row = []
        for name, way in WAYS.items():
            mean, cov = weighted_mean_cov(feats[layer].float().flatten(2), None, diagonal=False)
            whole = w2(way, mean, cov, target).item()
            # The tiled path: float64 sums, moments and loss.
            flat = feats[layer].double().flatten(2)
            count, first = flat.shape[2], flat.sum(2)
            tiled_mean = first / count
            tiled_cov = flat @ flat.transpose(1, 2) / count - tiled_mean[..., :, None] * tiled_mean[..., None, :]
            tiled = w2(way, tiled_mean, tiled_cov, target).item()
            row.append(f"{name} {whole / exact - 1:+.1e} / {tiled / exact - 1:+.1e}")
        print(f"{label:9s} {layer}  loss {exact:10.4g}  " + "  ".join(row))


def near_convergence(vgg: VGG19Features, texture: Tensor, steps: int) -> Tensor:
    """A synthesis after ``steps`` L-BFGS iterations on the eigh loss summed over the layers, from seeded noise."""
    targets = {layer: target_of(f) for layer, f in vgg(texture).items()}
    pixels = torch.rand(texture.shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    optimizer = torch.optim.LBFGS([pixels], max_iter=steps, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        feats = vgg(pixels.clamp(0, 1))
        loss = sum(
            w2(w2_cross_trace, *weighted_mean_cov(feats[layer].flatten(2), None, False), targets[layer]).sum()
            for layer in LAYERS
        )
        loss.backward()
        return loss

    optimizer.step(closure)
    return pixels.detach().clamp(0, 1)


def costs(repeats: int) -> None:
    vgg = VGG19Features(["relu1_1", "relu2_1", "relu3_1", "relu4_1"], weights="random")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        a, b = (
            vgg(torch.rand(1, 3, 128, 128, generator=generator)),
            vgg(torch.rand(1, 3, 128, 128, generator=generator)),
        )
    for layer in ("relu1_1", "relu2_1", "relu3_1", "relu4_1"):
        target = target_of(b[layer])
        mean0, cov0 = weighted_mean_cov(a[layer].float().flatten(2), None, diagonal=False)
        times: dict[str, list[float]] = {name: [] for name in WAYS}
        for _ in range(repeats):
            for name, way in WAYS.items():
                cov = cov0.clone().requires_grad_()
                start = time.perf_counter()
                w2(way, mean0, cov, target).sum().backward()
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) for name, t in times.items()}
        base = medians["ns20"]
        print(
            f"{layer} ({cov0.shape[-1]} ch): "
            + "  ".join(f"{name} {s * 1e3:.2f} ms ({s / base:.2f}x)" for name, s in medians.items())
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100, help="L-BFGS iterations of the near-converged synthesis")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    vgg = VGG19Features(list(LAYERS), weights=args.weights)
    texture = load_image("sample:gravel", args.size)
    print(f"VGG19 {vgg.weights_used}; gravel at {args.size} px. Relative error of each way: whole / tiled")
    noise = torch.rand(texture.shape, generator=torch.Generator().manual_seed(0))
    errors(vgg, noise, texture, "noise")
    errors(vgg, near_convergence(vgg, texture, args.steps), texture, "converged")
    print(f"seconds per loss evaluation (forward + backward, CPU, {torch.get_num_threads()} threads), median:")
    costs(args.repeats)


if __name__ == "__main__":
    main()
