"""The LoRA loop's checkpoints: resuming gives exactly the weights of an uninterrupted run."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from finetune.train import LORA_WEIGHT_NAME, TrainingStopped, resolve_mixed_precision, train_lora
from finetune.world import generate_brand
from registry.base_models import TINY_RANDOM, ensure_base_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = ensure_base_model(TINY_RANDOM, tmp_path_factory.mktemp("models"), 1024)
    examples = list(generate_brand("acme", n=4, seed=0))
    return base.path, examples


def _weights(folder):
    return load_file(str(folder / LORA_WEIGHT_NAME))


@pytest.mark.slow  # trains twice, with a resume (~40 s on 2 cores)
def test_resume_equals_uninterrupted(setup, tmp_path):
    base, examples = setup
    kw = dict(steps=6, rank=2, alpha=2.0, batch_size=2, seed=3)
    straight = train_lora(base, examples, tmp_path / "straight", **kw)

    saved: dict[int, dict] = {}
    with pytest.raises(TrainingStopped):
        train_lora(
            base,
            examples,
            tmp_path / "first",
            checkpoint_every=3,
            on_checkpoint=lambda step, state: saved.__setitem__(step, state),
            should_stop=lambda: 3 in saved,
            **kw,
        )
    assert sorted(saved) == [3] and not (tmp_path / "first").exists()  # stopped: nothing saved
    resumed = train_lora(base, examples, tmp_path / "resumed", resume=saved[3], **kw)

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and a
    for k in a:
        assert (a[k] == b[k]).all(), k


def test_accumulation_and_precision_choice(setup, tmp_path):
    base, examples = setup
    losses: list[float] = []
    train_lora(
        base,
        examples,
        tmp_path / "acc",
        steps=2,
        rank=2,
        alpha=2.0,
        batch_size=1,
        seed=1,
        gradient_accumulation_steps=2,
        progress=lambda _s, _t, loss: losses.append(loss),
    )
    assert len(losses) == 2  # steps count optimizer updates, not micro-batches
    assert (tmp_path / "acc" / LORA_WEIGHT_NAME).is_file()
    assert resolve_mixed_precision("auto") == "no"  # CPU here; bf16/fp16 on CUDA
    with pytest.raises(ValueError, match="mixed_precision"):
        resolve_mixed_precision("fp8")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        train_lora(base, examples, tmp_path / "x", gradient_accumulation_steps=0)
