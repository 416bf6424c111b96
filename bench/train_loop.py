"""Training steps/s of brandfarm's LoRA loop vs. a plain diffusers + peft + accelerate loop.

Both loops run in this process on the same base model, data, batch size, LoRA rank and target
modules, taking turns step by step (two threads, never at once), so that both see the same
machine load; each step is timed alone and the median step time is reported (mean too). The
plain loop follows the recipe of diffusers'
`examples/text_to_image/train_text_to_image_lora.py`: every step encodes the images with the
VAE and the captions with the text encoder, adds DDPM noise, predicts it with the UNet, and
steps AdamW through `accelerator.backward`. Ours (`finetune.train.train_lora`) encodes the
dataset once (VAE posteriors and text encoder outputs), samples latents from the stored
posteriors, and looks noise-schedule values up in tables made once per run.

    python bench/train_loop.py [--base-model tiny-sd-random] [--steps 30] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
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


class Lockstep:
    """Two loops in two threads that take turns, one step each, never running at once.

    On a machine shared with other work, load changes from minute to minute; loops run one
    after the other would each see a different load. Taking turns step by step gives both the
    same load, and each step's time counts only its own work (not the other loop's turn).
    """

    def __init__(self) -> None:
        self.turn = {"ours": threading.Semaphore(0), "plain": threading.Semaphore(0)}
        self.times: dict[str, list[float]] = {"ours": [], "plain": []}
        self.resumed: dict[str, float] = {}
        self.errors: list[BaseException] = []
        self.done: set[str] = set()

    def run(self, name: str, loop: Callable[[], None]) -> None:
        """Run one loop in its turns; a failure ends it and lets the other loop finish."""
        self.start(name)
        try:
            loop()
        except BaseException as e:  # noqa: BLE001 - reported by main()
            self.errors.append(e)
        finally:
            self.finish(name)

    def start(self, name: str) -> None:
        """Wait for this loop's first turn."""
        self.turn[name].acquire()
        self.resumed[name] = time.perf_counter()

    def step_done(self, name: str) -> None:
        """Record the step that just ended, give the other loop its turn, wait for ours."""
        self.times[name].append(time.perf_counter() - self.resumed[name])
        other = "plain" if name == "ours" else "ours"
        if other not in self.done:
            self.turn[other].release()
            self.turn[name].acquire()
        self.resumed[name] = time.perf_counter()

    def finish(self, name: str) -> None:
        """This loop is done: the other one may run on alone."""
        self.done.add(name)
        self.turn["plain" if name == "ours" else "ours"].release()


def ours(base_dir: str, examples: list, steps: int, batch: int, rank: int, lock: Lockstep) -> None:
    # The setup (loading, encoding the dataset) is part of the first turn.
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
            progress=lambda *_: lock.step_done("ours"),
        )


def plain(base_dir: str, examples: list, steps: int, batch: int, rank: int, lock: Lockstep) -> None:
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
    unet.train()
    lock.step_done("plain")  # end of setup: not a step
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
        loss.item()  # as train_lora's progress does
        lock.step_done("plain")


def steps_per_s(times: list[float]) -> tuple[float, float]:
    """Median and mean steps/s, leaving out the first step (warm-up)."""
    rest = times[1:]
    return 1 / statistics.median(rest), len(rest) / sum(rest)


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
        lock = Lockstep()
        shape = (args.steps, args.batch_size, args.rank)
        loops = [
            threading.Thread(
                target=lock.run,
                args=(name, functools.partial(loop, base.path, examples, *shape, lock)),
                name=name,
            )
            for name, loop in (("ours", ours), ("plain", plain))
        ]
        for t in loops:
            t.start()
        lock.turn["ours"].release()
        for t in loops:
            t.join()
    if lock.errors:
        raise SystemExit(f"a loop failed: {lock.errors}")
    # ours's first time is its setup plus step 1; plain's is its setup alone, then step 1.
    ours_steps = lock.times["ours"]
    plain_steps = lock.times["plain"][1:]
    (a, a_mean), (b, b_mean) = steps_per_s(ours_steps), steps_per_s(plain_steps)
    print(
        f"base model {base.id}, batch {args.batch_size}, rank {args.rank}, "
        f"{args.steps} steps each, interleaved step by step, torch threads "
        f"{torch.get_num_threads()}"
    )
    print(f"brandfarm train_lora : {a:7.2f} steps/s (median; mean {a_mean:.2f})")
    print(f"plain diffusers loop : {b:7.2f} steps/s (median; mean {b_mean:.2f})")
    print(f"ratio (ours / plain) : {a / b:7.2f}x (median; mean {a_mean / b_mean:.2f}x)")


if __name__ == "__main__":
    main()
