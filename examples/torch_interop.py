"""A torch model that calls cupyconvt: tensors in, tensors out, zero-copy, on torch's stream.

A small decoder block keeps its parameters in a torch.nn.ConvTranspose3d and runs the transposed
convolution through the plain function ``cupyconvt.conv_transpose3d``, which torch's autograd does
not see, so the block runs under torch.no_grad(). (To train, use the drop-in layer
``cupyconvt.torch.ConvTranspose3d``, as examples/train_decoder.py does.) The result is compared
with torch's own layer. On a CUDA machine the call
also runs on a non-default stream and in bfloat16; elsewhere the CPU backend runs it.

    python examples/torch_interop.py
"""

from __future__ import annotations

import torch

import cupyconvt


class DecoderBlock(torch.nn.Module):
    """Upsample 2x with a learned transposed convolution, then a ReLU."""

    def __init__(self, c_in: int = 16, c_out: int = 8) -> None:
        super().__init__()
        self.up = torch.nn.ConvTranspose3d(c_in, c_out, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up
        y = cupyconvt.conv_transpose3d(x, up.weight, up.bias, stride=up.stride,
                                       padding=up.padding, output_padding=up.output_padding,
                                       groups=up.groups, dilation=up.dilation)  # fmt: skip
        return torch.relu(y)


def check(block: DecoderBlock, x: torch.Tensor, tol: float, label: str) -> bool:
    with torch.no_grad():
        got = block(x)
        ref = torch.relu(block.up.double()(x.double()))
        block.up.to(x.dtype)
    assert isinstance(got, torch.Tensor) and got.device == x.device and got.dtype == x.dtype
    err = float((got.double() - ref).norm() / ref.norm())
    ok = err <= tol
    print(f"{label:28s} {tuple(x.shape)} -> {tuple(got.shape)} {str(got.dtype):15s} "
          f"rel err vs torch (float64) {err:.1e} {'ok' if ok else 'MISMATCH'}")  # fmt: skip
    return ok


def main() -> int:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    block = DecoderBlock().to(device)
    x = torch.randn(2, 16, 24, 24, 24, device=device)
    ok = check(block, x, 1e-5, f"float32 on {device}")
    ok &= check(block.double(), x.double(), 1e-12, f"float64 on {device}")
    if device == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # cupyconvt runs on torch's current stream
            ok &= check(block.float(), x, 1e-5, "float32 on a side stream")
        ok &= check(block.to(torch.bfloat16), x.to(torch.bfloat16), 1e-2, "bfloat16 on cuda")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
