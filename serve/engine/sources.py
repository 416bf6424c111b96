"""Where a row starts when it is not plain text-to-image: an edit's source image (img2img with
a strength, inpainting by masked latent blending), interpolated initial noise, and mixed prompt
embeddings. All from the pipeline's own components (its VAE, text encoder and scheduler), so an
edit runs in the same batch, on the same UNet and with the same brand adapters as a generation;
no second pipeline or copy of the weights exists.

The steps are those of diffusers' `StableDiffusionImg2ImgPipeline` (timesteps cut by strength,
`scheduler.add_noise` at the first of them) and of `StableDiffusionInpaintPipeline` with a
4-channel UNet (after each step the area outside the mask is replaced by the source latents
noised to the next timestep, and by the source latents themselves after the last).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from serve.engine.adapters import LoraRouter


@dataclass
class SourceLatents:
    """What a row keeps to blend its unmasked area back at every step (inpainting)."""

    latents: Any  # the source image's latents, (1, C, h, w)
    noise: Any  # the row's initial noise: what add_noise mixes into the source
    mask: Any  # (1, 1, h, w), 1 = repaint, 0 = keep
    image: Any = None  # the source (PIL, the row's size): pasted back outside the mask
    pixel_mask: Any = None  # the mask (PIL L, 255 = repaint)


def slerp(a, b, t: float):  # noqa: ANN001, ANN201 - torch tensors
    """Spherical interpolation between two noise tensors: keeps the Gaussian's norm along the
    way, where a linear mix would shrink it (and wash out the image) half-way."""
    import torch

    a_flat, b_flat = a.flatten().double(), b.flatten().double()
    cos = torch.clamp(torch.dot(a_flat, b_flat) / (a_flat.norm() * b_flat.norm()), -1.0, 1.0).item()
    theta = math.acos(cos)
    if theta < 1e-4:  # (anti)parallel: slerp degenerates into a lerp
        return (1 - t) * a + t * b
    s = math.sin(theta)
    return (math.sin((1 - t) * theta) / s) * a + (math.sin(t * theta) / s) * b


def noise(shape: tuple[int, ...], seed: int, device: str, dtype):  # noqa: ANN001, ANN201
    """The initial noise of `seed`, drawn as `StableDiffusionPipeline` draws it (CPU generator)."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator("cpu").manual_seed(seed)
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def mixed_embeddings(
    pipeline,  # noqa: ANN001 - a diffusers StableDiffusionPipeline
    router: LoraRouter,
    prompts: tuple[tuple[str, float], ...],
    negative_prompt: str | None,
    guided: bool,
    slots: tuple[str, ...],
    scales: tuple[float, ...],
):  # noqa: ANN201 - (prompt_embeds, negative_embeds)
    """Text embeddings of weighted prompts, mixed linearly (an interpolation's lerp, a blend's
    weighted mean); the negative embeddings are the negative prompt's, as for one prompt."""
    device = pipeline._execution_device
    mixed = negative = None
    with router.routing([slots], [scales]):
        for prompt, weight in prompts:
            embeds, neg = pipeline.encode_prompt(prompt, device, 1, guided, negative_prompt)
            mixed = weight * embeds if mixed is None else mixed + weight * embeds
            negative = neg if negative is None else negative
    return mixed, negative


def strength_timesteps(scheduler, steps: int, strength: float):  # noqa: ANN001, ANN201
    """The timesteps an img2img row runs: the last `strength` share of the schedule
    (diffusers' `get_timesteps`); none at strength 0, all at 1."""
    init = min(int(steps * strength), steps)
    start = max(steps - init, 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def encode_image(pipeline, png: bytes, generator, latent_hw: tuple[int, int]):  # noqa: ANN001, ANN201
    """The source image's latents from the pipeline's VAE (sampled with the row's generator, as
    diffusers' img2img does), resized to the row's latent size when it differs (upscale: the
    latents, not the pixels, are enlarged, and the refining pass fills in the detail)."""
    import torch.nn.functional as F

    image = _image(png, "RGB")
    vae = pipeline.vae
    pixels = pipeline.image_processor.preprocess(image).to(pipeline._execution_device, vae.dtype)
    latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
    if tuple(latents.shape[-2:]) != latent_hw:
        latents = F.interpolate(latents, size=latent_hw, mode="bicubic", align_corners=False)
    return latents


def latent_mask(png: bytes, latent_hw: tuple[int, int], device: str, dtype):  # noqa: ANN001, ANN201
    """A mask PNG (L, 255 = repaint) at latent resolution: a latent cell is repainted when any
    of its pixels is, so the seam falls in the kept area's side, never inside the edit."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    mask = np.asarray(_image(png, "L"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy((mask >= 0.5).astype(np.float32))[None, None]
    cells = F.adaptive_max_pool2d(tensor, latent_hw)
    return cells.to(device=device, dtype=dtype)


def start_latents(
    pipeline,  # noqa: ANN001 - a diffusers StableDiffusionPipeline
    scheduler,  # noqa: ANN001 - the row's own scheduler, timesteps set
    png: bytes,
    mask_png: bytes | None,
    strength: float,
    steps: int,
    initial_noise,  # noqa: ANN001 - the row's noise, (1, C, h, w)
    generator,  # noqa: ANN001 - the row's CPU generator
):  # noqa: ANN201 - (timesteps, latents, SourceLatents or None)
    """An edit row's timesteps, first latents and (with a mask) what it blends back."""
    latent_hw = tuple(initial_noise.shape[-2:])
    source = encode_image(pipeline, png, generator, latent_hw).to(initial_noise.dtype)
    timesteps = strength_timesteps(scheduler, steps, strength)
    if strength >= 1:
        latents = initial_noise * scheduler.init_noise_sigma
    elif len(timesteps):
        latents = scheduler.add_noise(source, initial_noise, timesteps[:1])
    else:
        latents = source
    keep = None
    if mask_png is not None:
        mask = latent_mask(mask_png, latent_hw, source.device, source.dtype)
        keep = SourceLatents(source, initial_noise, mask, _image(png, "RGB"), _image(mask_png, "L"))
        if not len(timesteps):
            latents = source
    return timesteps, latents, keep


def _image(png: bytes, mode: str):  # noqa: ANN202 - a PIL image
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert(mode)


def overlay(pipeline, keep: SourceLatents, image):  # noqa: ANN001, ANN201 - PIL in and out
    """The decoded inpainting with the source's own pixels outside the mask (diffusers'
    `apply_overlay`): the VAE decoder mixes every latent into every pixel (its mid-block
    attends globally), so latents kept outside the mask decode a few levels off the source."""
    if keep.image is None or keep.image.size != image.size:
        return image
    return pipeline.image_processor.apply_overlay(keep.pixel_mask, keep.image, image)


def keep_unmasked(keep: SourceLatents, scheduler, latents, next_timestep):  # noqa: ANN001, ANN201
    """After a step: outside the mask, the source latents noised to the next timestep (or the
    source itself after the last step); inside, what the UNet made."""
    known = keep.latents
    if next_timestep is not None:
        known = scheduler.add_noise(known, keep.noise, next_timestep.reshape(1))
    return (1 - keep.mask) * known + keep.mask * latents


def edit_metadata(job, index: int) -> dict[str, str | int | float | None]:  # noqa: ANN001
    """PNG metadata of an edit, a mix and a derived render (`RenderJob.origin`), beside the
    generation's own."""
    meta: dict[str, str | int | float | None] = dict(job.origin)
    if job.source is not None:
        meta["strength"] = job.source.strength
        meta["masked"] = "yes" if job.source.mask is not None else None
    mix = job.mixes[index] if job.mixes else None
    if mix is not None:
        if mix.prompts:
            meta["prompt_mix"] = "; ".join(f"{w:.4g}*{p}" for p, w in mix.prompts)
        if mix.noise_seed is not None:
            meta["noise_seed"] = mix.noise_seed
            meta["noise_t"] = round(mix.noise_t, 6)
        if mix.adapter_scale is not None and job.adapter is not None:
            meta["adapter_scale"] = mix.adapter_scale
    return meta
