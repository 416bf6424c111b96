"""Tests of the built-in base model: the shipped pipeline follows held-out prompts, and the
training command is reproducible from its seed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from finetune import metrics, world
from finetune.base_model import BaseModelConfig, load_defaults, render_at_defaults, train_base_model

SHIPPED = Path(__file__).resolve().parents[2] / "registry" / "builtin" / "brandfarm-shapes"
#: Thresholds of the issue (chance is about 1/7, 1/7 and 1/3).
MIN_BG, MIN_FG, MIN_SHAPE = 0.80, 0.60, 0.50
RENDER_SEED = 1234


def test_shipped_model_is_small_and_documented() -> None:
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    print(f"shipped model: {size_mb:.2f} MB in {len(files)} files")
    assert size_mb <= 10.5
    card = (SHIPPED / "README.md").read_text()
    record = json.loads((SHIPPED / "training.json").read_text())
    for key in (
        "steps",
        "seed",
        "wall_time_s",
        "hardware",
        "losses",
        "default_steps",
        "default_guidance_scale",
        "default_size",
    ):
        assert key in record, key
    assert str(record["steps"]) in card
    # The project-built vocabulary ships beside the tokenizer.
    assert (SHIPPED / "tokenizer" / "vocab.json").is_file()
    assert (SHIPPED / "tokenizer" / "merges.txt").is_file()


@pytest.mark.slow  # renders every held-out combo (~2 min on 2 cores)
def test_shipped_model_follows_heldout_prompts() -> None:
    """Renders every held-out combo (never seen in training) at the model's default steps,
    guidance and size; about 10 s on two CPU cores."""
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED)
    pipe.set_progress_bar_config(disable=True)
    defaults = load_defaults(SHIPPED)
    prompts = [world.caption(c) for c in world.heldout_combos()]
    assert len(prompts) >= 30
    images = render_at_defaults(pipe, defaults, prompts, RENDER_SEED)
    assert images[0].size == (defaults["default_size"],) * 2
    result = metrics.prompt_adherence(images, prompts)
    print(
        f"held-out adherence over {len(prompts)} prompts at {defaults}: "
        f"bg={result.bg:.2f} fg={result.fg:.2f} shape={result.shape:.2f}"
    )
    assert result.bg >= MIN_BG
    assert result.fg >= MIN_FG
    assert result.shape >= MIN_SHAPE


def test_shipped_tokenizer_keeps_caption_words_whole() -> None:
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED)
    for word in world.vocabulary():
        assert len(pipe.tokenizer.tokenize(word)) == 1, word
    # Words it never saw (a tenant's trigger word) spell out instead of becoming unknown.
    tokens = pipe.tokenizer.tokenize("zorblax")
    assert len(tokens) > 1 and pipe.tokenizer.unk_token not in tokens


def _tiny_run(out: Path) -> dict[str, torch.Tensor]:
    config = BaseModelConfig(dataset_size=64, vae_steps=3, warmup_steps=2)
    train_base_model(out, steps=3, seed=5, batch_size=4, config=config)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


@pytest.mark.slow  # trains the base model twice (~1 min on 2 cores)
def test_training_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    first = _tiny_run(tmp_path / "a")
    second = _tiny_run(tmp_path / "b")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["steps"] == 3 and record["seed"] == 5 and record["losses"]


def test_training_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="steps"):
        train_base_model(tmp_path, steps=0)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train_base_model(tmp_path, steps=1, checkpoint_every=1)


def test_command_line_documents_every_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "finetune.base_model", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    for flag in (
        "--out",
        "--steps",
        "--seed",
        "--batch-size",
        "--vae-steps",
        "--checkpoint-every",
        "--checkpoint-dir",
        "--threads",
    ):
        assert flag in out
