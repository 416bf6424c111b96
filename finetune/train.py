"""The LoRA fine-tune loop: teach a base pipeline a brand from captioned images.

``train_lora`` reads images and captions (a list or an upload-format folder), adds a peft LoRA
adapter to the UNet attention projections, trains it with the denoising loss of the base model,
and saves a diffusers LoRA file (rank and alpha in its safetensors metadata) that
``pipe.load_lora_weights(out_dir)`` loads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image

from finetune.base_model import (
    NoiseTables,
    denoising_loss,
    encode_dataset,
    images_to_tensor,
    seed_everything,
    tokenize,
)
from finetune.checkpoints import capture_rng, restore_rng

#: Called as ``progress(step, total_steps, loss)`` after every optimizer step.
Progress = Callable[[int, int, float], None]
#: Called as ``on_checkpoint(step, state)`` every ``checkpoint_every`` steps; ``state`` is what
#: ``resume=`` takes back (LoRA weights, optimizer, RNG, step, losses), ready for
#: ``finetune.checkpoints.encode`` (safetensors + JSON).
OnCheckpoint = Callable[[int, dict], None]


def resolve_mixed_precision(choice: str) -> str:
    """`auto` → bf16 on a CUDA GPU that supports it, fp16 on other CUDA GPUs, `no` on CPU."""
    if choice not in ("auto", "no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be auto, no, fp16 or bf16, got {choice!r}")
    if choice != "auto":
        return choice
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class TrainingStopped(Exception):
    """``should_stop()`` returned True: training ended early and nothing was saved."""


#: The UNet attention projections a brand adapter trains.
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

Examples = Sequence[tuple[Image.Image, str]]


def load_examples(folder: str | Path) -> list[tuple[Image.Image, str]]:
    """Read an upload-format dataset folder: every image with a same-name ``.txt`` caption."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"dataset folder {folder} does not exist")
    examples = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption_path = path.with_suffix(".txt")
        if not caption_path.is_file():
            raise ValueError(f"image {path.name} has no caption file {caption_path.name}")
        with Image.open(path) as image:
            examples.append((image.convert("RGB"), caption_path.read_text().strip()))
    if not examples:
        raise ValueError(f"dataset folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return examples


def encode_captions(
    text_encoder: torch.nn.Module,
    tokenizer,
    captions: Sequence[str],
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """The text encoder's last hidden states of every caption, ``(len(captions), tokens, width)``.

    Each distinct caption is encoded once (brand datasets repeat captions)."""
    distinct = list(dict.fromkeys(captions))
    ids = tokenize(tokenizer, distinct).to(device)
    states = torch.cat(
        [text_encoder(ids[i : i + batch_size])[0] for i in range(0, len(ids), batch_size)]
    )
    row = {caption: i for i, caption in enumerate(distinct)}
    return states[torch.tensor([row[c] for c in captions], device=device)]


def train_lora(
    base_model_dir: str | Path,
    examples: Examples | str | Path,
    out_dir: str | Path,
    steps: int = 300,
    rank: int = 4,
    alpha: float = 4.0,
    lr: float = 1e-3,
    batch_size: int = 8,
    seed: int = 0,
    progress: Progress | None = None,
    min_snr_gamma: float | None = 5.0,
    checkpoint_every: int | None = None,
    on_checkpoint: OnCheckpoint | None = None,
    resume: dict | None = None,
    should_stop: Callable[[], bool] | None = None,
    gradient_accumulation_steps: int = 1,
    mixed_precision: str = "auto",
) -> Path:
    """Fine-tune a LoRA adapter of ``base_model_dir``'s UNet on ``examples``; returns ``out_dir``.

    ``examples`` is a list of (image, caption) pairs or a folder of images with same-name
    ``.txt`` captions. Writes ``out_dir/pytorch_lora_weights.safetensors`` and
    ``out_dir/lora_training.json``. With ``resume`` (a state given to ``on_checkpoint``) training
    continues from that step with the same optimizer and random state, as if never interrupted.
    ``should_stop`` is polled every step; when it says so, ``TrainingStopped`` is raised.
    ``mixed_precision`` is ``auto`` (bf16 on a CUDA GPU that has it, else fp16; none on CPU),
    ``no``, ``fp16`` or ``bf16``; ``gradient_accumulation_steps`` micro-batches make one step.
    """
    # Sanity checks.
    checks = (
        ("steps", steps),
        ("rank", rank),
        ("batch_size", batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
    )
    for name, value in checks:
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if alpha <= 0 or lr <= 0:
        raise ValueError(f"alpha and lr must be > 0, got alpha={alpha}, lr={lr}")
    if isinstance(examples, str | Path):
        examples = load_examples(examples)
    if not examples:
        raise ValueError("examples is empty; pass at least one (image, caption) pair")
    out_dir = Path(out_dir)
    started = time.monotonic()
    generator = seed_everything(seed)

    # Load scheduler, tokenizer and models; only the LoRA weights will train.
    pipe = StableDiffusionPipeline.from_pretrained(base_model_dir, safety_checker=None)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
        model.eval()
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights="gaussian",
        target_modules=list(LORA_TARGET_MODULES),
    )
    unet.add_adapter(lora_config)
    lora_params = [p for p in unet.parameters() if p.requires_grad]

    # Accelerate places the models and, on a GPU, trains in mixed precision with the LoRA
    # weights kept in fp32.
    # `cpu=True` without CUDA: then a multi-process launch (Ray Train) is data-parallel over gloo.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=resolve_mixed_precision(mixed_precision),
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    vae.to(device)
    text_encoder.to(device, dtype=weight_dtype)
    unet.to(device)

    # Encode the dataset once: images at the model's resolution to latent posteriors (sampled
    # afresh each step), captions to text encoder outputs (kohya's `cache_text_encoder_outputs`;
    # the text encoder is frozen here, so its outputs never change). Then neither the VAE nor the
    # text encoder runs again, and they leave the device.
    resolution = unet.config.sample_size * pipe.vae_scale_factor
    pixels = images_to_tensor([image for image, _ in examples], resolution).to(device)
    with torch.no_grad():
        latent_mean, latent_std = encode_dataset(vae, pixels)
        encoder_hidden_states = encode_captions(
            text_encoder, tokenizer, [text for _, text in examples], device
        )
    del pixels
    scaling_factor = vae.config.scaling_factor
    tables = NoiseTables(noise_scheduler, device, min_snr_gamma)
    del pipe, vae, text_encoder, tokenizer
    latent_shape = (batch_size, *latent_mean.shape[1:])

    # Train (from a checkpoint's state when resuming). One step is one optimizer update of
    # `gradient_accumulation_steps` micro-batches, so checkpoints fall on update boundaries.
    optimizer = torch.optim.AdamW(lora_params, lr=lr, weight_decay=1e-4)
    losses: list[float] = []
    first_step = 0
    if resume is not None:
        set_peft_model_state_dict(unet, resume["lora"])
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        losses = list(resume["losses"])
        first_step = int(resume["step"])
        if "rng" in resume:
            restore_rng(resume["rng"])
    unet, optimizer = accelerator.prepare(unet, optimizer)
    unet.train()
    for step in range(first_step, steps):
        if should_stop is not None and should_stop():
            raise TrainingStopped(f"stopped before step {step + 1} of {steps}")
        step_loss = torch.zeros((), device=device)
        for _ in range(gradient_accumulation_steps):
            with accelerator.accumulate(unet):
                idx = torch.randint(0, len(examples), (batch_size,), generator=generator)
                eps = torch.randn(latent_shape, generator=generator).to(device)
                idx = idx.to(device)
                latents = (latent_mean[idx] + latent_std[idx] * eps) * scaling_factor
                loss = denoising_loss(unet, tables, latents, encoder_hidden_states[idx], generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach()
        # One host sync per step, not one per micro-batch.
        losses.append(step_loss.item() / gradient_accumulation_steps)
        if progress is not None:
            progress(step + 1, steps, losses[-1])
        if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            on_checkpoint(
                step + 1,
                {
                    "step": step + 1,
                    "lora": get_peft_model_state_dict(accelerator.unwrap_model(unet)),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "losses": list(losses),
                    "rng": capture_rng(),
                },
            )
    unet = accelerator.unwrap_model(unet)

    # Save the adapter in diffusers' LoRA format, with its LoraConfig in the file's metadata.
    unet.eval()
    lora_state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        out_dir,
        unet_lora_layers=lora_state,
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    summary = {
        "base_model": str(base_model_dir),
        "examples": len(examples),
        "steps": steps,
        "rank": rank,
        "alpha": alpha,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "wall_time_s": round(time.monotonic() - started, 1),
        "losses": [
            round(sum(losses[i : i + 25]) / len(losses[i : i + 25]), 5)
            for i in range(0, len(losses), 25)
        ],
    }
    (out_dir / "lora_training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return out_dir
