"""Evaluation of a fine-tuned adapter before it is registered: base vs. production vs. candidate.

A job holds a few of its dataset's images out of training (`split_heldout`). The evaluation
renders the same prompts with the same seeds three ways, with the base model, the brand's
production version (when there is one) and the new version, and measures:

- ``heldout_denoise_loss``: the denoising loss of each variant on the held-out images, at fixed
  (timestep, noise) draws, so the three numbers differ only by the weights. It works for any
  base model.
- on the built-in shapes model: ``brand_score`` and ``prompt_adherence`` (``finetune.metrics``,
  read from the renders' pixels).

`evaluate` returns the figures (`registry.promotion.EvalFigures`, which the gate reads back
from the version's tags) and a grid image (one row per prompt: base, production, candidate).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from finetune import metrics, world
from finetune.base_model import images_to_tensor, render_prompts
from finetune.train import encode_captions
from registry.promotion import EvalFigures

Examples = Sequence[tuple[Image.Image, str]]
#: Seed of the first evaluation render (prompt ``i`` uses ``EVAL_SEED + i``) and of the loss draws.
EVAL_SEED = 4242
#: Smallest side of a grid cell: the built-in model renders 32 px, too small to look at.
GRID_CELL = 128


def split_heldout(
    examples: Examples, wanted: int, seed: int
) -> tuple[list[tuple[Image.Image, str]], list[tuple[Image.Image, str]]]:
    """(train, held out): ``min(wanted, len // 4)`` images picked by ``seed``, never trained on.

    The same (examples, wanted, seed) always gives the same split, so a resumed or data-parallel
    worker trains on exactly the same images."""
    k = min(wanted, len(examples) // 4)
    held = set(random.Random(seed).sample(range(len(examples)), k))
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


def eval_prompts(given: Sequence[str] | None, heldout: Examples, most: int) -> list[str]:
    """The job's own eval prompts, else the held-out images' captions (at most ``most``)."""
    prompts = list(given) if given else [caption for _, caption in heldout]
    return prompts[:most]


@dataclass(frozen=True)
class Evaluation:
    figures: EvalFigures
    grid: Image.Image
    renders: dict[str, list[Image.Image]]  # variant -> one image per prompt


@torch.no_grad()
def heldout_denoise_loss(pipe, heldout: Examples, draws: int, seed: int = EVAL_SEED) -> float:  # noqa: ANN001
    """Mean unweighted denoising loss of the pipeline's UNet (with its active adapters) on the
    held-out images: the posterior mean latents, ``draws`` timesteps spread evenly over the
    schedule, noise from ``seed``. Deterministic: only the weights change the number."""
    from diffusers import DDPMScheduler

    unet, vae = pipe.unet, pipe.vae
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = unet.config.sample_size * pipe.vae_scale_factor
    pixels = images_to_tensor([image for image, _ in heldout], resolution)
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    latents = (latents * vae.config.scaling_factor).to(unet.device, torch.float32)
    states = encode_captions(
        pipe.text_encoder, pipe.tokenizer, [c for _, c in heldout], pipe.text_encoder.device
    ).to(unet.device, unet.dtype)
    alphas = scheduler.alphas_cumprod.to(unet.device, torch.float32)
    total = scheduler.config.num_train_timesteps
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for j in range(draws):
        t = int((j + 0.5) * total / draws)
        noise = torch.randn(latents.shape, generator=generator).to(unet.device)
        a, s = alphas[t] ** 0.5, (1 - alphas[t]) ** 0.5
        noisy = a * latents + s * noise
        target = a * noise - s * latents if v_prediction else noise
        timesteps = torch.full((len(latents),), t, device=unet.device, dtype=torch.long)
        pred = unet(noisy.to(unet.dtype), timesteps, states).sample.float()
        losses.append(torch.mean((pred - target) ** 2).item())
    return sum(losses) / len(losses)


def grid_image(rows: Sequence[Sequence[Image.Image | None]], header: Sequence[str]) -> Image.Image:
    """One row per prompt, one column per variant (``None``: no such variant, drawn gray)."""
    side = max(GRID_CELL, *(im.width for row in rows for im in row if im is not None))
    label = 14
    grid = Image.new("RGB", (side * len(header), label + side * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(header):
        draw.text((c * side + 4, 1), name, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            box = (c * side, label + r * side)
            if image is None:
                grid.paste((200, 200, 200), (*box, box[0] + side, box[1] + side))
            else:
                grid.paste(image.resize((side, side), Image.Resampling.NEAREST), box)
    return grid


def evaluate(
    pipe,  # noqa: ANN001 - a diffusers text-to-image pipeline with LoRA support
    candidate: str | Path,
    production: str | Path | None,
    prompts: Sequence[str],
    heldout: Examples,
    *,
    steps: int,
    size: int,
    guidance_scale: float,
    loss_draws: int,
    brand: world.Brand | None = None,
    production_version: int | None = None,
) -> Evaluation:
    """Render ``prompts`` (seeds ``EVAL_SEED + i``) and measure the held-out loss with the base
    model, ``production`` (a LoRA folder, or None) and ``candidate``. ``brand`` (built-in
    model only) adds ``brand_score``, and ``prompt_adherence`` where every prompt is a
    shapes-world caption. The pipeline's LoRAs are unloaded again at the end."""
    if not prompts:
        raise ValueError("an evaluation needs at least one prompt")
    pipe.load_lora_weights(str(candidate), adapter_name="candidate")
    variants = ["base", "candidate"]
    if production is not None:
        pipe.load_lora_weights(str(production), adapter_name="production")
        variants.insert(1, "production")
    scores: dict[str, dict[str, float]] = {}
    renders: dict[str, list[Image.Image]] = {}
    try:
        for variant in variants:
            if variant == "base":
                pipe.disable_lora()
            else:
                pipe.enable_lora()
                pipe.set_adapters([variant])
            images = render_prompts(pipe, prompts, EVAL_SEED, steps, guidance_scale, size)
            renders[variant] = images
            scores[variant] = _scores(pipe, images, prompts, heldout, loss_draws, brand)
    finally:
        pipe.unload_lora_weights()
    figures = EvalFigures(
        scores=scores,
        reference="production" if production is not None else "base",
        production_version=production_version if production is not None else None,
        prompts=len(prompts),
        heldout_images=len(heldout),
    )
    rows = [
        [renders[v][i] if v in renders else None for v in ("base", "production", "candidate")]
        for i in range(len(prompts))
    ]
    grid = grid_image(rows, ("base", "production", "candidate"))
    return Evaluation(figures, grid, renders)


def _scores(
    pipe,  # noqa: ANN001
    images: list[Image.Image],
    prompts: Sequence[str],
    heldout: Examples,
    loss_draws: int,
    brand: world.Brand | None,
) -> dict[str, float]:
    out: dict[str, float] = {}
    if heldout:
        out["heldout_denoise_loss"] = heldout_denoise_loss(pipe, heldout, loss_draws)
    if brand is not None:
        out["brand_score"] = metrics.brand_score(images, brand).score
        # A prompt that is not a shapes-world caption: no adherence.
        with contextlib.suppress(ValueError):
            out["prompt_adherence"] = metrics.prompt_adherence(images, prompts).all
    return out


def infer_brand(name: str, examples: Examples) -> world.Brand:
    """The shapes-world brand a built-in-model job is about: the built-in brand of that name,
    else the palette and mark corner its dataset shows (colors seen in at least a fifth of the
    images; the corner where the mark shows most often)."""
    if name in world.BRANDS:
        return world.BRANDS[name]
    readings = [metrics.read_image(image) for image, _ in examples]
    n = max(1, len(readings))

    def common(values: list[str | None]) -> tuple[str, ...]:
        found = sorted({v for v in values if v and values.count(v) * 5 >= n})
        return tuple(found) or (values[0] or world.COLORS[0],)

    corners = {
        corner: sum(metrics.mark_present(image, world.Mark(corner)) for image, _ in examples)
        for corner in world.CORNERS
    }
    return world.Brand(
        name,
        name,
        common([r.bg for r in readings]),
        common([r.fg for r in readings]),
        world.Mark(max(corners, key=corners.get)),
    )
