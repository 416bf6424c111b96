"""One denoising step over a batch of rows, built from a diffusers text-to-image pipeline's own
components (text encoder, UNet, scheduler, VAE).

A row is one image. It carries everything a solo `pipeline(...)` call would hold for it: its
prompt embeddings, its own scheduler instance and timesteps (rows may differ in step count and
join at any step), its latents drawn from its own CPU generator, its guidance scale, and its
adapter slots and scales. Every per-row operation below is the one `StableDiffusionPipeline`
does for a batch of one, so a row renders the pixels of the solo call; only the UNet runs over
the whole batch (see docs/architecture.md for where that holds bit for bit).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from serve.engine import sources
from serve.engine.adapters import LoraRouter
from serve.engine.invariant import batch_invariant


@dataclass
class RowState:
    """The denoising state of one image."""

    prompt_embeds: Any  # (1, tokens, dim)
    negative_embeds: Any | None  # (1, tokens, dim) when guided, else None
    guidance_scale: float
    scheduler: Any
    timesteps: Any
    latents: Any
    generator: Any
    step_kwargs: dict = field(default_factory=dict)
    slots: tuple[str, ...] = ()  # its adapters' slots, in the order their deltas add up
    scales: tuple[float, ...] = ()
    index: int = 0  # the next timestep to run
    keep: sources.SourceLatents | None = None  # inpainting: what to keep outside the mask

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def guided(self) -> bool:
        return self.negative_embeds is not None

    @property
    def width(self) -> int:
        """Rows of the UNet batch this row takes (2 with classifier-free guidance)."""
        return 2 if self.guided else 1


def guided(pipeline, guidance_scale: float) -> bool:  # noqa: ANN001 - a diffusers pipeline
    """Whether the pipeline runs classifier-free guidance (`do_classifier_free_guidance`)."""
    return guidance_scale > 1 and pipeline.unet.config.time_cond_proj_dim is None


def start_row(
    pipeline,  # noqa: ANN001 - a diffusers StableDiffusionPipeline
    router: LoraRouter,
    *,
    prompt: str,
    negative_prompt: str | None,
    width: int,
    height: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    slots: tuple[str, ...] = (),
    scales: tuple[float, ...] = (),
    source=None,  # noqa: ANN001 - serve.protocol.SourceImage: an edit's image, mask, strength
    mix=None,  # noqa: ANN001 - serve.protocol.RowMix: mixed prompts, interpolated noise
) -> RowState:
    """Encode the prompt, set the row's timesteps and draw its initial latents, in the order
    and with the calls of `StableDiffusionPipeline.__call__`. An edit (`source`) starts from its
    image's latents (`sources.start_latents`); a `mix` replaces the prompt's embeddings by a
    weighted mix of prompts and slerps the initial noise toward another seed's."""
    import torch
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        retrieve_timesteps,
    )
    from diffusers.utils.torch_utils import randn_tensor

    device = pipeline._execution_device
    cfg = guided(pipeline, guidance_scale)
    # The text encoder's LoRA layers (if the adapters have any) see this row's adapters.
    if mix is not None and mix.prompts:
        prompt_embeds, negative_embeds = sources.mixed_embeddings(
            pipeline, router, mix.prompts, negative_prompt, cfg, slots, scales
        )
    else:
        with router.routing([slots], [scales]):
            prompt_embeds, negative_embeds = pipeline.encode_prompt(
                prompt, device, 1, cfg, negative_prompt
            )
    scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    timesteps, _ = retrieve_timesteps(scheduler, steps, device)
    # A CPU generator gives the same initial noise on every device.
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (
        1,
        pipeline.unet.config.in_channels,
        height // pipeline.vae_scale_factor,
        width // pipeline.vae_scale_factor,
    )
    latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
    if mix is not None and mix.noise_seed is not None:
        other = sources.noise(shape, mix.noise_seed, device, prompt_embeds.dtype)
        latents = sources.slerp(latents, other, mix.noise_t)
    keep = None
    if source is not None:
        timesteps, latents, keep = sources.start_latents(
            pipeline, scheduler, source.png, source.mask, source.strength, steps, latents, generator
        )
    else:
        latents = latents * scheduler.init_noise_sigma
    return RowState(
        prompt_embeds=prompt_embeds,
        negative_embeds=negative_embeds if cfg else None,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        timesteps=timesteps,
        latents=latents,
        generator=generator,
        step_kwargs=pipeline.prepare_extra_step_kwargs(generator, 0.0),
        slots=slots,
        scales=scales,
        keep=keep,
    )


def step(
    pipeline,  # noqa: ANN001 - a diffusers StableDiffusionPipeline
    router: LoraRouter,
    rows: list[RowState],
    invariant: bool = False,
) -> None:
    """Advance every row by one of its own timesteps.

    One UNet call runs all rows (a guided row is two UNet rows), and each row uses its own
    adapters (peft's per-adapter sub-batches, `LoraRouter`'s lanes). With `invariant`, the
    call computes every row batch-invariantly: its products, the adapters' sub-batch products
    included, run through `invariant.batch_invariant`, and a call of one row is padded to two.
    A row's result is then bit-identical however many rows share its call and whoever they are
    (docs/architecture.md, "Pixel identity").
    """
    import torch

    inputs, embeds, times, names, scales = [], [], [], [], []
    for row in rows:
        t = row.timesteps[row.index]
        latent_input = torch.cat([row.latents] * 2) if row.guided else row.latents
        inputs.append(row.scheduler.scale_model_input(latent_input, t))
        if row.guided:
            embeds.append(torch.cat([row.negative_embeds, row.prompt_embeds]))
        else:
            embeds.append(row.prompt_embeds)
        times.extend([t] * row.width)
        names.extend([row.slots] * row.width)
        scales.extend([row.scales] * row.width)
    sample, hidden, timestep = torch.cat(inputs), torch.cat(embeds), torch.stack(times)
    real = sample.shape[0]
    if invariant and real == 1:  # a lone UNet row takes other kernels than two or more
        sample, hidden, timestep = (
            sample.repeat(2, 1, 1, 1),
            hidden.repeat(2, 1, 1),
            timestep.repeat(2),
        )
        names, scales = names * 2, scales * 2
    with (
        router.routing(names, scales),
        batch_invariant() if invariant else nullcontext(),
    ):
        noise = pipeline.unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0][
            :real
        ]
    offset = 0
    for row in rows:
        pred = noise[offset : offset + row.width]
        offset += row.width
        if row.guided:
            uncond, text = pred.chunk(2)
            pred = uncond + row.guidance_scale * (text - uncond)
        t = row.timesteps[row.index]
        row.latents = row.scheduler.step(
            pred, t, row.latents, **row.step_kwargs, return_dict=False
        )[0]
        if row.keep is not None:
            following = row.timesteps[row.index + 1] if row.index + 1 < len(row.timesteps) else None
            row.latents = sources.keep_unmasked(row.keep, row.scheduler, row.latents, following)
        row.index += 1


def decode(pipeline, row: RowState):  # noqa: ANN001, ANN201 - pipeline in, PIL image out
    """The finished row's image, decoded alone as the pipeline decodes a batch of one."""
    vae = pipeline.vae
    image = vae.decode(
        row.latents / vae.config.scaling_factor, return_dict=False, generator=row.generator
    )[0]
    return pipeline.image_processor.postprocess(image, output_type="pil", do_denormalize=[True])[0]
