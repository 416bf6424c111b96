"""Training steps/s of brandfarm's LoRA loop vs. a plain diffusers + peft + accelerate loop.

Both loops run in this process, side by side, on the same base model, data, batch size, LoRA
rank and target modules. The plain loop follows the recipe of diffusers'
`examples/text_to_image/train_text_to_image_lora.py`: every step encodes the images with the
VAE and the captions with the text encoder, adds DDPM noise, predicts it with the UNet, and
steps AdamW through `accelerator.backward`. Ours (`finetune.train.train_lora`) encodes the
dataset once (VAE posteriors and text encoder outputs), samples latents from the stored
posteriors, and looks noise-schedule values up in tables made once per run.

    python bench/train_loop.py [--base-model tiny-sd-random] [--steps 30] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig

from finetune.base_model import images_to_tensor, tokenize
from finetune.train import LORA_TARGET_MODULES, train_lora
from finetune.world import generate_brand
from registry.base_models import ensure_base_model


def ours(base_dir: str, examples: list, steps: int, batch: int, rank: int) -> float:
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        train_lora(
            base_dir,
            examples,
            Path(out) / "lora",
            steps=steps,
            rank=rank,
            alpha=rank,
            batch_size=batch,
            seed=0,
            progress=lambda *_: stamps.append(time.perf_counter()),
        )
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])  # steps/s after the first step


def plain(base_dir: str, examples: list, steps: int, batch: int, rank: int) -> float:
    torch.manual_seed(0)
    accelerator = Accelerator(mixed_precision="no", gradient_accumulation_steps=1)
    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=list(LORA_TARGET_MODULES),
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    lr_scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = images_to_tensor([im for im, _ in examples], resolution)
    ids = tokenize(tokenizer, [c for _, c in examples])
    stamps = []
    unet.train()
    for _ in range(steps):
        idx = torch.randint(0, len(examples), (batch,))
        with accelerator.accumulate(unet):
            latents = vae.encode(pixels[idx]).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,))
            noisy = noise_scheduler.add_noise(latents, noise, t)
            hidden = text_encoder(ids[idx], return_dict=False)[0]
            target = (
                noise_scheduler.get_velocity(latents, noise, t)
                if noise_scheduler.config.prediction_type == "v_prediction"
                else noise
            )
            pred = unet(noisy, t, hidden, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), target.float())
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="tiny-sd-random", help="Catalog id or folder.")
    parser.add_argument("--steps", type=int, default=30, help="Steps per loop.")
    parser.add_argument("--batch-size", type=int, default=4, help="Images per step.")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    parser.add_argument("--images", type=int, default=16, help="Brand dataset size.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as models:
        base = ensure_base_model(args.base_model, Path(models), 1024)
        examples = list(generate_brand("acme", n=args.images, seed=0))
        a = ours(base.path, examples, args.steps, args.batch_size, args.rank)
        b = plain(base.path, examples, args.steps, args.batch_size, args.rank)
    print(
        f"base model {base.id}, batch {args.batch_size}, rank {args.rank}, "
        f"{args.steps} steps each, torch threads {torch.get_num_threads()}"
    )
    print(f"brandfarm train_lora : {a:7.2f} steps/s")
    print(f"plain diffusers loop : {b:7.2f} steps/s")
    print(f"ratio (ours / plain) : {a / b:7.2f}x")


if __name__ == "__main__":
    main()
