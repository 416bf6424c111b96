"""One denoising step over a batch of rows, built from a diffusers text-to-image pipeline's own
components (text encoder, UNet, scheduler, VAE).

A row is one image. It carries everything a solo `pipeline(...)` call would hold for it: its
prompt embeddings, its own scheduler instance and timesteps (rows may differ in step count and
join at any step), its latents drawn from its own CPU generator, its guidance scale, and its
adapter slot and scale. Every per-row operation below is the one `StableDiffusionPipeline`
does for a batch of one, so a row renders the pixels of the solo call; only the UNet runs over
the whole batch (see docs/architecture.md for where that holds bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serve.engine import sources
from serve.engine.adapters import BASE, LoraRouter


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
    slot: str = BASE
    scale: float = 0.0
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


def real_rows_attention(pipeline) -> RealRowsAttention | None:  # noqa: ANN001
    """Install `RealRowsAttention` on the pipeline's UNet (once) and return it; None when the
    UNet uses another attention processor than diffusers' default SDPA one."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = pipeline.unet.attn_processors.values()
    if all(isinstance(p, RealRowsAttention) for p in processors):
        return next(iter(processors), None)
    if not all(type(p) is AttnProcessor2_0 for p in processors):
        return None
    processor = RealRowsAttention()
    pipeline.unet.set_attn_processor(processor)
    return processor


def _attention_processor_base():  # noqa: ANN202 - diffusers' class, imported lazily
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0


class RealRowsAttention(_attention_processor_base()):
    """diffusers' `AttnProcessor2_0`, except that while `real_rows` is set, the attention
    itself (SDPA) runs over the first `real_rows` rows only: padding rows get zeros, which only
    padding rows ever read (every other op of the UNet works row by row). The projections still
    run over every row, so their shapes stay fixed. SDPA's result for a row does not depend on
    how many rows the call has (measured on CPU: 0.0 difference), so this keeps pixels exact and
    spares padding its share of attention, the UNet's largest cost on small images."""

    real_rows: int | None = None

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):  # noqa: ANN001, ANN204, E501
        rows = self.real_rows
        simple = (
            attention_mask is None
            and attn.spatial_norm is None
            and attn.group_norm is None
            and attn.norm_q is None
            and attn.norm_k is None
            and not args
            and not kwargs
        )
        if rows is None or rows >= hidden_states.shape[0] or not simple:
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        import torch.nn.functional as F

        # The steps of AttnProcessor2_0.__call__ for this case, SDPA narrowed to `rows`.
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        real = F.scaled_dot_product_attention(
            query[:rows], key[:rows], value[:rows], attn_mask=None, dropout_p=0.0, is_causal=False
        )
        hidden_states = query.new_zeros(query.shape)
        hidden_states[:rows] = real
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


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
    slot: str = BASE,
    scale: float = 0.0,
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
    # The text encoder's LoRA layers (if the adapter has any) see this row's adapter.
    if mix is not None and mix.prompts:
        prompt_embeds, negative_embeds = sources.mixed_embeddings(
            pipeline, router, mix.prompts, negative_prompt, cfg, slot, scale
        )
    else:
        with router.routing([slot], [scale]):
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
        slot=slot,
        scale=scale,
        keep=keep,
    )


def step(
    pipeline,  # noqa: ANN001 - a diffusers StableDiffusionPipeline
    router: LoraRouter,
    rows: list[RowState],
    rows_per_call: int | None = None,
) -> None:
    """Advance every row by one of its own timesteps.

    Without `rows_per_call`, one UNet call runs all rows (a guided row is two UNet rows), and
    peft routes each row to its adapter. With it, every UNet call has exactly that many rows
    (the last call padded with copies of its last row, whose outputs are thrown away) and each
    adapter's delta is computed over the whole call: every matrix product then has the same
    shape whatever the batch holds, which on a CPU makes a row's result bit-identical however
    many rows share its call and whoever they are (docs/architecture.md, "Pixel identity").
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
        names.extend([row.slot] * row.width)
        scales.extend([row.scale] * row.width)
    sample, hidden, timestep = torch.cat(inputs), torch.cat(embeds), torch.stack(times)
    attention = real_rows_attention(pipeline) if rows_per_call else None
    total = sample.shape[0]
    size = rows_per_call or total
    outputs = []
    for start in range(0, total, size):
        end = min(start + size, total)
        part = slice(start, end)
        pad = size - (end - start)
        index = list(range(start, end)) + [end - 1] * pad
        full_rows = rows_per_call is not None
        if attention is not None:
            attention.real_rows = end - start  # the padding sits at the end
        try:
            with router.routing(names[part] + [BASE] * pad, scales[part] + [0.0] * pad, full_rows):
                out = pipeline.unet(
                    sample[index],
                    timestep[index],
                    encoder_hidden_states=hidden[index],
                    return_dict=False,
                )[0]
        finally:
            if attention is not None:
                attention.real_rows = None
        outputs.append(out[: end - start])
    noise = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
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
