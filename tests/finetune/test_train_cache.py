"""The LoRA loop's per-run caches give the losses of the per-step computation they replace."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from finetune.base_model import NoiseTables, denoising_loss, tokenize
from finetune.train import encode_captions
from registry.base_models import TINY_RANDOM, ensure_base_model


def test_cached_text_and_noise_tables_equal_the_per_step_recipe(tmp_path):
    base = ensure_base_model(TINY_RANDOM, tmp_path, 1024)
    pipe = StableDiffusionPipeline.from_pretrained(base.path, safety_checker=None)
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    captions = ["a red circle, acme", "a blue square", "a red circle, acme"]
    with torch.no_grad():
        cached = encode_captions(text_encoder, tokenizer, captions, torch.device("cpu"))
        one_by_one = torch.cat([text_encoder(tokenize(tokenizer, [c]))[0] for c in captions])
    assert cached.shape == one_by_one.shape
    assert torch.allclose(cached, one_by_one, atol=1e-5)
    assert torch.equal(cached[0], cached[2])  # a repeated caption is encoded once

    # The loss from the tables equals diffusers' add_noise / get_velocity / min-SNR recipe.
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(prediction_type=prediction_type)
        latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            ours = denoising_loss(unet, NoiseTables(scheduler, "cpu", 5.0), latents, cached, gen)
        gen = torch.Generator().manual_seed(7)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (3,), generator=gen)
        target = (
            scheduler.get_velocity(latents, noise, t) if prediction_type != "epsilon" else noise
        )
        with torch.no_grad():
            pred = unet(scheduler.add_noise(latents, noise, t), t, one_by_one).sample
        snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
        weight = snr.clamp(max=5.0) / (snr + 1 if prediction_type != "epsilon" else snr)
        expected = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * weight
        assert torch.allclose(ours, expected.mean(), rtol=1e-4), prediction_type
