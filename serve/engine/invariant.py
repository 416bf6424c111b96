"""Batch-invariant matrix products: a row's result must not depend on how many rows share its
call, so that an image's pixels never depend on its batch-mates.

CPU BLAS (MKL via torch) and oneDNN choose a kernel by the product's shape, and the kernel
decides the rounding of the last bits. Probed op by op on the built-in model (torch 2.13, one
thread; docs/architecture.md, "Pixel identity"), with every other op of the UNet giving a row
the same bits at any batch size from 2 to 32 rows:

- a `Linear` over few rows (the time embeddings: one row per image) rounds differently at 2
  rows than at 4: such products are padded with zero rows to `SMALL_PRODUCT_ROWS`;
- a 1x1 `Conv2d` (attention `proj_in`/`proj_out`, resnet shortcuts) rounds differently at 16
  rows than at 2-8: it is computed as the `Linear` it is, over every pixel of every row, which
  is invariant;
- any UNet call of a single row rounds differently (its convolutions take another path): the
  engine never makes one (`denoise.step` pads it to two).

Inside `batch_invariant()` these replacements apply to every `nn.Linear` and `nn.Conv2d` of the
process (the base layers and the LoRA layers peft adds later alike); outside it torch runs as
usual. The switch is per thread, so only the engine loop's UNet calls see it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Products over fewer rows than this are padded to it (zero rows, results thrown away).
SMALL_PRODUCT_ROWS = 64

_state = threading.local()
_install_lock = threading.Lock()
_installed = False


def _active() -> bool:
    return getattr(_state, "active", False)


@contextmanager
def batch_invariant() -> Iterator[None]:
    """Within the block, this thread's Linear and Conv2d layers compute batch-invariantly."""
    _install()
    previous = _active()
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


def _install() -> None:
    """Route `nn.Linear` and `nn.Conv2d` forwards through the invariant versions (once)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        import torch.nn.functional as F
        from torch import nn

        linear_forward = nn.Linear.forward
        conv_forward = nn.Conv2d.forward

        def linear(self, x):  # noqa: ANN001, ANN202 - torch's signature
            if not _active():
                return linear_forward(self, x)
            return _padded_linear(F, x, self.weight, self.bias)

        def conv2d(self, x):  # noqa: ANN001, ANN202 - torch's signature
            if not _active() or not _is_pointwise(self) or x.dim() != 4:
                return conv_forward(self, x)
            weight = self.weight.view(self.out_channels, self.in_channels)
            y = _padded_linear(F, x.permute(0, 2, 3, 1), weight, self.bias)
            return y.permute(0, 3, 1, 2)

        nn.Linear.forward = linear
        nn.Conv2d.forward = conv2d
        _installed = True


def _padded_linear(F, x, weight, bias):  # noqa: ANN001, ANN202, N803 - torch objects
    """`F.linear`, padding a product of few rows with zero rows to `SMALL_PRODUCT_ROWS`."""
    features = x.shape[-1]
    rows = x.numel() // features if features else 0
    if 0 < rows < SMALL_PRODUCT_ROWS:
        import torch

        flat = x.reshape(rows, features)
        padded = torch.cat([flat, flat.new_zeros(SMALL_PRODUCT_ROWS - rows, features)])
        return F.linear(padded, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def _is_pointwise(conv) -> bool:  # noqa: ANN001 - an nn.Conv2d
    """A 1x1 convolution that is exactly a Linear over the channels of each pixel."""
    return (
        tuple(conv.kernel_size) == (1, 1)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.padding in ((0, 0), 0, "valid")
    )
