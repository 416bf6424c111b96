"""Batch-invariant products: a row's UNet output must not depend on how many rows share the
call or where it sits (serve/engine/invariant.py)."""

from __future__ import annotations

import pytest
import torch

from registry.base_models import SHAPES, ensure_base_model, load_pipeline
from serve.engine.invariant import batch_invariant


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    torch.set_num_threads(1)  # as the engine runs
    model = ensure_base_model(SHAPES, tmp_path_factory.mktemp("models"), 1024)
    return load_pipeline(model, "cpu").unet


def _inputs(unet, rows: int, side: int):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(rows, unet.config.in_channels, side, side, generator=g)
    timestep = torch.randint(0, 1000, (rows,), generator=g)
    hidden = torch.randn(rows, 8, unet.config.cross_attention_dim, generator=g)
    return sample, timestep, hidden


def _largest_difference(unet, side: int) -> float:
    """Largest difference of any row's output between pairs (one guided image) and batches of
    3 to 16 rows at several offsets."""
    sample, timestep, hidden = _inputs(unet, 16, side)

    def run(lo: int, hi: int) -> torch.Tensor:
        out = unet(sample[lo:hi], timestep[lo:hi], encoder_hidden_states=hidden[lo:hi])
        return out.sample

    with torch.no_grad():
        pairs = torch.cat([run(i, i + 2) for i in range(0, 16, 2)])
        worst = 0.0
        for rows in (3, 4, 6, 8, 12, 16):
            for lo in sorted({0, 1, 16 - rows}):
                got = run(lo, lo + rows)
                worst = max(worst, (got - pairs[lo : lo + rows]).abs().max().item())
    return worst


def test_every_row_gets_the_same_bits_at_any_batch_size(unet):
    with batch_invariant():
        assert _largest_difference(unet, 16) == 0.0


def test_plain_products_do_round_by_batch_size(unet):
    """The control: without the switch the same comparison differs (else the test above would
    prove nothing on this machine)."""
    assert _largest_difference(unet, 16) > 0.0


def test_the_switch_holds_only_inside_the_block_and_its_thread():
    import threading

    from serve.engine import invariant

    seen = []
    with batch_invariant():
        worker = threading.Thread(target=lambda: seen.append(invariant._active()))
        worker.start()
        worker.join()
        inside = invariant._active()
    assert (inside, seen, invariant._active()) == (True, [False], False)
