"""Train a small 3D decoder with cupyconvt's ConvTranspose3d and, side by side, with torch's.

The task: recover a smooth 3D field (a sum of random Gaussian blobs) from a copy average-pooled
4x along each axis. The loss is the MSE relative to that of trilinear upsampling (1 = no better
than trilinear). The decoder is the upsampling half of a 3D U-Net: a stem convolution, two
stages of [ConvTranspose3d 2x up, SiLU, Conv3d, SiLU] and a head convolution, added to the
trilinear upsampling of its input.

Three copies of the model differ only in their ConvTranspose3d layers: ``cupyconvt.torch``,
``torch.nn``, and a control that computes torch's layer in float64 and rounds once. They start
from the same parameters (a state_dict copy) and see the same batches in the same order, with
TF32 off, so all three compute in IEEE float32 and differ by rounding alone. The script prints
the loss curves at intervals, the largest relative difference between cupyconvt's and torch's,
the control's difference from torch for scale, and the time per training step, and writes a
PNG. It fails if cupyconvt's curve strays from torch's by more than 1e-5, or by more than 10x
the control's distance, whichever is larger.

With smooth activations (SiLU, the default) rounding differences stay at ~1e-7 through
training. With ``--activation relu`` they do not: a unit whose input sits near the kink can flip
on one implementation and not the other, and Adam turns such differences into full-size steps,
so any two float32 implementations drift apart after some tens of steps, the control included.

    python examples/train_decoder.py [--steps 300] [--device cuda|cpu] [--out train_decoder.png]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import cupyconvt.torch

#: cupyconvt's loss may differ from torch's by LOSS_RTOL (relative; float32 rounding is 6e-8),
#: or by DRIFT_FACTOR times the float64 control's largest difference, whichever is larger.
LOSS_RTOL, DRIFT_FACTOR = 1e-5, 10.0
ACTIVATIONS = {"silu": F.silu, "relu": F.relu}


class Decoder(torch.nn.Module):
    """(N, 1, s, s, s) -> (N, 1, 4s, 4s, 4s): two 2x upsampling stages and a skip connection."""

    def __init__(
        self, conv_transpose: type[torch.nn.ConvTranspose3d], width: int, activation: str = "silu"
    ) -> None:
        super().__init__()
        self.act = ACTIVATIONS[activation]
        c1, c2 = width, width // 2
        self.stem = torch.nn.Conv3d(1, width, 3, padding=1)
        self.up1 = conv_transpose(width, c1, 4, stride=2, padding=1)
        self.conv1 = torch.nn.Conv3d(c1, c1, 3, padding=1)
        self.up2 = conv_transpose(c1, c2, 4, stride=2, padding=1)
        self.conv2 = torch.nn.Conv3d(c2, c2, 3, padding=1)
        self.head = torch.nn.Conv3d(c2, 1, 3, padding=1)

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        act = self.act
        h = act(self.stem(low))
        h = act(self.conv1(act(self.up1(h))))
        h = act(self.conv2(act(self.up2(h))))
        return self.head(h) + upsample(low)


class Float64ConvTranspose3d(torch.nn.ConvTranspose3d):
    """The control: torch's layer computed in float64 and rounded to float32 once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.double()
        y = F.conv_transpose3d(x.double(), self.weight.double(), b, self.stride, self.padding,
                               self.output_padding, self.groups, self.dilation)  # fmt: skip
        return y.to(x.dtype)


def upsample(low: torch.Tensor) -> torch.Tensor:
    """The baseline the decoder improves on: trilinear 4x upsampling."""
    return F.interpolate(low, scale_factor=4, mode="trilinear", align_corners=False)


def blobs(batch: int, size: int, generator: torch.Generator, n_blobs: int = 6) -> torch.Tensor:
    """(batch, 1, size, size, size) float32 fields, each a sum of random Gaussian blobs."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    grid = torch.stack(torch.meshgrid(c, c, c, indexing="ij"), dim=-1)  # (s, s, s, 3)
    centres = torch.rand(batch, n_blobs, 1, 1, 1, 3, generator=generator)
    widths = 0.06 + 0.12 * torch.rand(batch, n_blobs, 1, 1, 1, generator=generator)
    heights = torch.randn(batch, n_blobs, 1, 1, 1, generator=generator)
    d2 = ((grid - centres) ** 2).sum(-1)
    return (heights * torch.exp(-d2 / (2 * widths**2))).sum(1, keepdim=True)


def make_batches(steps: int, batch: int, size: int, seed: int, device: str) -> list[tuple]:
    """(low-res input, target, trilinear's MSE) for every step, drawn once for all models."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        high = blobs(batch, 4 * size, generator)
        low = F.avg_pool3d(high, 4)
        baseline = F.mse_loss(upsample(low), high)
        batches.append((low.to(device), high.to(device), baseline.to(device)))
    return batches


def train(model, batches, lr: float, device: str) -> tuple[list[float], list[float]]:
    """Adam on the relative MSE; returns the loss and the wall time (s) of every step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses, times = [], []
    for low, high, baseline in batches:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(low), high) / baseline
        loss.backward()
        opt.step()
        losses.append(loss.item())  # waits for the step
        times.append(time.perf_counter() - t0)
    return losses, times


def relative(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)]


def plot(path: str, losses: dict[str, list[float]], rel: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_rel) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 2))
    for (label, curve), style in zip(losses.items(), ("-", "--", ":"), strict=True):
        ax.plot(range(1, len(curve) + 1), curve, style, label=f"{label} ConvTranspose3d")
    ax.set_ylabel("loss (MSE / trilinear's MSE)")
    ax.legend()
    ax.set_title("3D decoder training: same init, same data")
    for label, r in rel.items():
        nonzero = [(i + 1, v) for i, v in enumerate(r) if v > 0]  # equal losses leave gaps
        if nonzero:
            steps, values = zip(*nonzero, strict=True)
            ax_rel.semilogy(steps, values, ".", markersize=3, label=label)
    ax_rel.set_ylabel("relative difference of loss")
    ax_rel.set_xlabel("step")
    ax_rel.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")  # fmt: skip
    parser.add_argument("--size", type=int, help="low-res side (default cuda 8, cpu 4)")
    parser.add_argument("--width", type=int, help="channels (default cuda 32, cpu 8)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--activation", choices=tuple(ACTIVATIONS), default="silu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="train_decoder.png")
    args = parser.parse_args()
    device = args.device
    size = args.size or (8 if device == "cuda" else 4)
    width = args.width or (32 if device == "cuda" else 8)
    torch.backends.cudnn.allow_tf32 = False  # IEEE float32 in torch's layers too
    torch.backends.cuda.matmul.allow_tf32 = False

    torch.manual_seed(args.seed)
    layers = {"torch": torch.nn.ConvTranspose3d, "cupyconvt": cupyconvt.torch.ConvTranspose3d,
              "float64 control": Float64ConvTranspose3d}  # fmt: skip
    models = {k: Decoder(v, width, args.activation).to(device) for k, v in layers.items()}
    for m in models.values():
        m.load_state_dict(models["torch"].state_dict())
    batches = make_batches(args.steps, args.batch, size, args.seed, device)
    print(f"device {device}: {args.steps} steps, batch {args.batch}, {size}^3 -> {4 * size}^3, "
          f"width {width}, {args.activation}, Adam lr {args.lr}")  # fmt: skip

    runs = {label: train(m, batches, args.lr, device) for label, m in models.items()}
    losses = {label: runs[label][0] for label in ("cupyconvt", "torch", "float64 control")}
    rel = {
        "cupyconvt vs torch": relative(losses["cupyconvt"], losses["torch"]),
        "float64 control vs torch": relative(losses["float64 control"], losses["torch"]),
    }
    ours, control = rel.values()

    every = max(1, args.steps // 10)
    print(f"{'step':>6} {'loss cupyconvt':>15} {'loss torch':>15} {'rel diff':>9} "
          f"{'control rel diff':>17}")  # fmt: skip
    for i in [*range(0, args.steps, every), args.steps - 1]:
        print(f"{i + 1:6d} {losses['cupyconvt'][i]:15.8f} {losses['torch'][i]:15.8f} "
              f"{ours[i]:9.1e} {control[i]:17.1e}")  # fmt: skip
    worst, worst_control = max(ours), max(control)
    tolerance = max(LOSS_RTOL, DRIFT_FACTOR * worst_control)
    ok = worst <= tolerance
    verdict = "ok" if ok else "MISMATCH"
    print(f"max relative difference of the loss curves: {worst:.1e} (float64 control vs torch: "
          f"{worst_control:.1e}; tolerance {tolerance:.0e}) {verdict}")  # fmt: skip
    skip = min(5, args.steps - 1)  # the first steps include kernel compilation and plan set-up
    for label in ("cupyconvt", "torch"):
        times = runs[label][1][skip:]
        print(f"time per step, {label:9s}: {1e3 * statistics.median(times):8.2f} ms "
              f"(median of {len(times)})")  # fmt: skip
    plot(args.out, losses, rel)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
