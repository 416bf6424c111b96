"""The built-in base model: a tiny stock-diffusers text-to-image pipeline of the shapes world.

``train_base_model`` builds every part from config (a project-built CLIP tokenizer vocabulary, a
small ``CLIPTextModel``, ``AutoencoderKL`` and ``UNet2DConditionModel``), trains the autoencoder,
then the UNet and text encoder together, and saves a plain ``StableDiffusionPipeline`` that loads
anywhere with ``from_pretrained``. ``python -m finetune.base_model --help`` runs it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from finetune import world

#: Called as ``progress(phase, step, total_steps, loss)`` while training.
Progress = Callable[[str, int, int, float], None]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"


@dataclass
class BaseModelConfig:
    """Architecture and training recipe of the built-in base model (sizes in pixels/channels)."""

    resolution: int = 32
    """Side of the rendered images; the autoencoder halves it for the UNet."""
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (24, 48)
    unet_channels: tuple[int, ...] = (32, 64, 64)
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    max_tokens: int = 32
    num_train_timesteps: int = 1000
    dataset_size: int = 20_000
    """Number of pre-rendered training images (cycled through every epoch)."""
    vae_steps: int = 1500
    vae_lr: float = 2e-3
    lr: float = 1.2e-3
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    """Probability of training on an empty caption, which classifier-free guidance needs."""
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    default_steps: int = 20
    default_guidance_scale: float = 4.0

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


# ---------------------------------------------------------------------------------------------
# Building the parts.
# ---------------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2 / CLIP convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_vocab(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary where each of ``words`` is one token and anything else spells out.

    Every byte has a token (with and without the end-of-word suffix), so unknown words such as a
    tenant's trigger word become a sequence of letter tokens instead of ``<|endoftext|>``. Each
    word is built by a left-to-right chain of merges; chains of longer words rank first, and
    ranks are reordered until every word comes out as a single token.
    """
    alphabet = _byte_alphabet()
    order = sorted({w for w in words if len(w) > 1}, key=lambda w: (-len(w), w))
    for _ in range(len(order) + 1):
        vocab: dict[str, int] = {}
        for token in [BOS, EOS, *alphabet, *(c + WORD_END for c in alphabet)]:
            vocab.setdefault(token, len(vocab))
        merges: list[tuple[str, str]] = []
        for word in order:
            pieces = [*word[:-1], word[-1] + WORD_END]
            prefix = pieces[0]
            for piece in pieces[1:]:
                if (prefix, piece) not in merges:
                    merges.append((prefix, piece))
                prefix += piece
                vocab.setdefault(prefix, len(vocab))
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
        split = [w for w in order if len(tokenizer.tokenize(w)) != 1]
        if not split:
            return vocab, merges
        order = split + [w for w in order if w not in split]
    raise RuntimeError(f"could not build a vocabulary that keeps {split} whole")


def build_tokenizer(out_dir: Path, config: BaseModelConfig) -> CLIPTokenizer:
    """Write the project-built ``vocab.json`` and ``merges.txt`` to ``out_dir``, load them."""
    vocab, merges = build_vocab(world.vocabulary())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return CLIPTokenizer.from_pretrained(out_dir, model_max_length=config.max_tokens)


def build_text_encoder(tokenizer: CLIPTokenizer, config: BaseModelConfig) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_width,
            intermediate_size=4 * config.text_width,
            projection_dim=config.text_width,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_vae(config: BaseModelConfig) -> AutoencoderKL:
    n = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=8,
        sample_size=config.resolution,
        mid_block_add_attention=False,
    )


def build_unet(config: BaseModelConfig) -> UNet2DConditionModel:
    n = len(config.unet_channels)
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        # Text reaches every resolution: cross-attention in every block, and a pooled text
        # embedding added to the timestep embedding that scales and shifts every resnet.
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        cross_attention_dim=config.text_width,
        attention_head_dim=16,
        norm_num_groups=16,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
        resnet_time_scale_shift="scale_shift",
    )


def build_noise_scheduler(config: BaseModelConfig) -> DDPMScheduler:
    # Cosine schedule reaching (almost) zero signal at the last step: flat-color images leak
    # their mean color through any leftover signal, which a render from pure noise never has.
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
    )


def build_inference_scheduler(config: BaseModelConfig) -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # unused by "trailing" spacing; set to the value diffusers expects
        timestep_spacing="trailing",
    )


def assemble_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    config: BaseModelConfig,
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_inference_scheduler(config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return the CPU generator a training loop draws from."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def images_to_tensor(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """Stack PIL images into a ``(N, 3, R, R)`` float tensor in [-1, 1]."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.Resampling.BOX)
        arrays.append(np.asarray(image, dtype=np.float32))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch / 127.5 - 1.0


def tokenize(tokenizer: CLIPTokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def _autoencoder_images(n: int, seed: int, resolution: int) -> list[Image.Image]:
    """Training images of the base world, half of them with a mark of some color in some corner,
    so the autoencoder also reproduces brand marks it will meet in fine-tunes."""
    rng = random.Random(seed)
    combos = world.train_combos()
    colors = list(world.PALETTE) + list(world.MARK_COLORS)
    images = []
    for _ in range(n):
        mark = None
        if rng.random() < 0.5:
            mark = world.Mark(rng.choice(world.CORNERS), rng.choice(colors))
        scene = world.sample_scene(rng, rng.choice(combos), mark)
        images.append(world.render(scene, resolution))
    return images


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 10%."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_autoencoder(
    vae: AutoencoderKL,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    progress: Progress | None = None,
) -> list[float]:
    """Train ``vae`` to reconstruct ``images`` (MSE + a small KL term); returns the losses."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(50, steps))
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        batch = images[idx]
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None:
            progress("autoencoder", step + 1, steps, losses[-1])
    vae.eval()
    return losses


@torch.no_grad()
def encode_dataset(
    vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (sampled afresh each training step)."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        dist = vae.encode(images[start : start + batch_size]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


class NoiseTables:
    """Per-timestep tables of a DDPM schedule, computed once on the training device.

    ``scheduler.add_noise`` and ``get_velocity`` move ``alphas_cumprod`` to the device and take
    square roots on every call; a training loop looks the same values up here instead.
    """

    def __init__(
        self, scheduler: DDPMScheduler, device: torch.device | str, min_snr_gamma: float | None
    ) -> None:
        alphas_cumprod = scheduler.alphas_cumprod.to(device)
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.v_prediction = scheduler.config.prediction_type == "v_prediction"
        self.sqrt_alpha = alphas_cumprod**0.5
        self.sqrt_one_minus_alpha = (1 - alphas_cumprod) ** 0.5
        self.snr_weight = None
        if min_snr_gamma:
            # Min-SNR weighting (Hang et al. 2023), in its v-prediction form.
            snr = alphas_cumprod / (1 - alphas_cumprod)
            clamped = torch.clamp(snr, max=min_snr_gamma)
            self.snr_weight = clamped / (snr + 1) if self.v_prediction else clamped / snr


def denoising_loss(
    unet: UNet2DConditionModel,
    tables: NoiseTables,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """One denoising loss: noise ``latents`` to random timesteps, predict the target.

    Shared by the base-model training and the LoRA fine-tune (``finetune.train``), which passes
    text encoder outputs it computed once for the whole dataset.
    """
    # Drawn from the (CPU) generator, then moved: the same noise on every device.
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    timesteps = torch.randint(
        0, tables.num_train_timesteps, (latents.shape[0],), generator=generator
    ).to(latents.device)
    per_row = (-1,) + (1,) * (latents.ndim - 1)
    sqrt_alpha = tables.sqrt_alpha[timesteps].view(per_row)
    sqrt_one_minus_alpha = tables.sqrt_one_minus_alpha[timesteps].view(per_row)
    noisy = sqrt_alpha * latents + sqrt_one_minus_alpha * noise
    # v-prediction's velocity, as `scheduler.get_velocity` computes it.
    velocity = sqrt_alpha * noise - sqrt_one_minus_alpha * latents
    target = velocity if tables.v_prediction else noise
    pred = unet(noisy, timesteps, encoder_hidden_states).sample
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    if tables.snr_weight is not None:
        per_sample = per_sample * tables.snr_weight[timesteps]
    return per_sample.mean()


def diffusion_loss(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    generator: torch.Generator,
    min_snr_gamma: float | None,
) -> torch.Tensor:
    """``denoising_loss`` with the text encoder in the graph (the base model trains it)."""
    tables = NoiseTables(scheduler, latents.device, min_snr_gamma)
    return denoising_loss(unet, tables, latents, text_encoder(input_ids)[0], generator)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)


def _hardware() -> dict[str, Any]:
    return {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


@dataclass
class TrainingRecord:
    """What ``training.json`` records beside the weights."""

    steps: int
    seed: int
    batch_size: int
    wall_time_s: float
    hardware: dict[str, Any]
    config: dict[str, Any]
    default_steps: int
    default_guidance_scale: float
    default_size: int
    autoencoder_losses: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    """Mean diffusion loss of every block of 50 steps."""
    checkpoints: list[int] = field(default_factory=list)


def train_base_model(
    out_dir: str | Path,
    steps: int,
    seed: int = 0,
    batch_size: int = 32,
    config: BaseModelConfig | None = None,
    checkpoint_every: int = 0,
    checkpoint_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Train the built-in base model from scratch and save it as a diffusers pipeline.

    Phase 1 trains the autoencoder on world images; phase 2 trains the UNet and the text encoder
    together on latents of the training combos (``world.train_combos()``; the held-out combos are
    never seen). Every ``checkpoint_every`` steps a full pipeline of the EMA weights is saved to
    ``checkpoint_dir/step-NNNNNN``. Returns ``out_dir``.
    """
    config = config or BaseModelConfig()
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if checkpoint_every and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs a checkpoint_dir to write to")
    out_dir = Path(out_dir)
    started = time.monotonic()
    generator = seed_everything(seed)

    # Build the tokenizer (project vocabulary) and the three models from config.
    tokenizer = build_tokenizer(out_dir / "tokenizer", config)
    text_encoder = build_text_encoder(tokenizer, config)
    vae = build_vae(config)
    unet = build_unet(config)
    noise_scheduler = build_noise_scheduler(config)

    # Phase 1: the autoencoder.
    ae_images = images_to_tensor(
        _autoencoder_images(config.dataset_size // 2, seed + 1, config.resolution),
        config.resolution,
    )
    ae_losses = train_autoencoder(
        vae, ae_images, config.vae_steps, batch_size, config.vae_lr, generator, progress
    )
    vae.requires_grad_(False)

    # Render the training set and encode it once; the latent scale makes latents unit-variance.
    pairs = list(world.generate(config.dataset_size, seed, world.train_combos(), config.resolution))
    pixels = images_to_tensor([image for image, _ in pairs], config.resolution)
    latent_mean, latent_std = encode_dataset(vae, pixels)
    scaling_factor = float(1.0 / latent_mean.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    input_ids = tokenize(tokenizer, [text for _, text in pairs])
    empty_ids = tokenize(tokenizer, [""])[0]

    # Phase 2: the UNet and the text encoder, with EMA copies that are what gets saved.
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup_steps, steps))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    record = TrainingRecord(
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        wall_time_s=0.0,
        hardware=_hardware(),
        config=asdict(config),
        default_steps=config.default_steps,
        default_guidance_scale=config.default_guidance_scale,
        default_size=config.resolution,
        autoencoder_losses=[round(x, 5) for x in ae_losses[::50]],
    )
    window: list[float] = []
    for step in range(steps):
        idx = torch.randint(0, len(pairs), (batch_size,), generator=generator)
        eps = torch.randn(latent_mean[idx].shape, generator=generator)
        latents = (latent_mean[idx] + latent_std[idx] * eps) * scaling_factor
        ids = input_ids[idx].clone()
        drop = torch.rand(batch_size, generator=generator) < config.caption_dropout
        ids[drop] = empty_ids

        loss = diffusion_loss(
            unet, text_encoder, noise_scheduler, latents, ids, generator, config.min_snr_gamma
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)

        window.append(loss.item())
        if len(window) == 50 or step + 1 == steps:
            record.losses.append(round(sum(window) / len(window), 5))
            window = []
        if progress is not None:
            progress("diffusion", step + 1, steps, loss.item())
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            ckpt = Path(checkpoint_dir) / f"step-{step + 1:06d}"
            record.checkpoints.append(step + 1)
            record.wall_time_s = round(time.monotonic() - started, 1)
            _save(ckpt, vae, ema_text, tokenizer, ema_unet, config, record, step + 1)

    record.wall_time_s = round(time.monotonic() - started, 1)
    _save(out_dir, vae, ema_text, tokenizer, ema_unet, config, record, steps)
    return out_dir


def _save(
    out_dir: Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    config: BaseModelConfig,
    record: TrainingRecord,
    steps_done: int,
) -> None:
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, config)
    pipe.save_pretrained(out_dir)
    # Keep the project-built vocabulary files beside tokenizer.json for readers.
    vocab, merges = build_vocab(world.vocabulary())
    (out_dir / "tokenizer" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "tokenizer" / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    data = asdict(record)
    data["steps_done"] = steps_done
    (out_dir / "training.json").write_text(json.dumps(data, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# Rendering (used by the adherence test, the model card numbers and checkpoint evaluation).
# ---------------------------------------------------------------------------------------------


def load_defaults(model_dir: str | Path) -> dict[str, Any]:
    """``default_steps``, ``default_guidance_scale`` and ``default_size`` from ``training.json``."""
    data = json.loads((Path(model_dir) / "training.json").read_text())
    return {k: data[k] for k in ("default_steps", "default_guidance_scale", "default_size")}


@torch.no_grad()
def render_prompts(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    seed: int,
    steps: int,
    guidance_scale: float,
    size: int,
    batch_size: int = 64,
) -> list[Image.Image]:
    """Render one image per prompt; prompt ``i`` uses a generator seeded with ``seed + i``."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=size,
            width=size,
            generator=generators,
        )
        images.extend(out.images)
    return images


def render_at_defaults(
    pipe: StableDiffusionPipeline, defaults: dict[str, Any], prompts: Sequence[str], seed: int
) -> list[Image.Image]:
    """``render_prompts`` at a saved model's recorded default steps, guidance and size."""
    return render_prompts(
        pipe,
        prompts,
        seed=seed,
        steps=defaults["default_steps"],
        guidance_scale=defaults["default_guidance_scale"],
        size=defaults["default_size"],
    )


def heldout_adherence(model_dir: str | Path, seed: int = 1234) -> dict[str, float]:
    """Adherence of the saved pipeline on every held-out combo, at its recorded defaults."""
    from finetune.metrics import prompt_adherence  # keeps metrics optional for training

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    defaults = load_defaults(model_dir)
    prompts = [world.caption(c) for c in world.heldout_combos()]
    images = render_at_defaults(pipe, defaults, prompts, seed)
    result = prompt_adherence(images, prompts)
    return {"prompts": len(prompts), "bg": result.bg, "fg": result.fg, "shape": result.shape}


def write_model_card(model_dir: str | Path) -> Path:
    """Measure held-out adherence, then write the model card ``README.md`` (from training.json)."""
    model_dir = Path(model_dir)
    record = json.loads((model_dir / "training.json").read_text())
    measured = heldout_adherence(model_dir)
    record["heldout_adherence"] = measured
    (model_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    cfg = record["config"]
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    n_params = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("unet", "vae", "text_encoder")
    }
    size_mb = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()) / 1e6
    steps_done = record.get("steps_done", record["steps"])
    if steps_done < record["steps"]:
        stopped = (
            f"These are the EMA weights after **{steps_done}** steps of a run scheduled for "
            f"{record['steps']} steps (learning-rate schedule sized for {record['steps']}); the "
            "run was stopped there for lack of time, and this checkpoint is what ships."
        )
    else:
        stopped = f"These are the EMA weights after all **{steps_done}** steps."
    hw = record["hardware"]
    card = f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [brandfarm, tiny, procedural]
---

# brandfarm-shapes

The built-in base model of brandfarm: a tiny text-to-image `StableDiffusionPipeline` made only
of stock diffusers/transformers classes, trained from scratch by the project on its procedural
shapes world (`finetune/world.py`). It draws a circle, square or triangle of one of
{len(world.COLORS)} colors ({", ".join(world.COLORS)}) on a background of another, at
{cfg["resolution"]}x{cfg["resolution"]} pixels, from captions such as
`a red circle on a blue background`. Load it with plain
`StableDiffusionPipeline.from_pretrained(path)`.

## Parts

- tokenizer: `CLIPTokenizer` with a project-built BPE vocabulary (`tokenizer/vocab.json`,
  `merges.txt`): every caption word is one token, any other word spells out in letters.
- text encoder: `CLIPTextModel`, width {cfg["text_width"]}, {cfg["text_layers"]} layers,
  {n_params["text_encoder"]:,} parameters.
- autoencoder: `AutoencoderKL`, channels {tuple(cfg["vae_channels"])},
  {cfg["latent_channels"]} latent channels, scale factor 2, {n_params["vae"]:,} parameters.
- denoiser: `UNet2DConditionModel`, channels {tuple(cfg["unet_channels"])}, cross-attention in
  every block, pooled text added to the timestep embedding (`addition_embed_type="text"`),
  {n_params["unet"]:,} parameters.
- scheduler: `DDIMScheduler`, cosine betas, v-prediction, trailing timesteps.

{size_mb:.1f} MB on disk (fp32 safetensors).

## Defaults

`num_inference_steps={record["default_steps"]}`,
`guidance_scale={record["default_guidance_scale"]}`, `height=width={record["default_size"]}`.

## Training

Reproduce with `python -m finetune.base_model --out DIR --steps {record["steps"]} --seed
{record["seed"]} --batch-size {record["batch_size"]} --checkpoint-every 500 --checkpoint-dir CKPT`
(`brandfarm base-model train` wraps it).

1. Autoencoder: {cfg["vae_steps"]} steps (batch {record["batch_size"]}, AdamW lr {cfg["vae_lr"]},
   MSE + 1e-6 KL) on training-combo images, half of them with a mark of a random color in a
   random corner so brand marks reconstruct.
2. UNet + text encoder together: AdamW lr {cfg["lr"]} ({cfg["warmup_steps"]} warmup steps,
   cosine decay to 10%), batch {record["batch_size"]}, v-prediction loss with min-SNR weighting
   (gamma {cfg["min_snr_gamma"]}), captions dropped {cfg["caption_dropout"]:.0%} of the time for
   classifier-free guidance, EMA {cfg["ema_decay"]}, on {cfg["dataset_size"]:,} rendered images
   of the {len(world.train_combos())} training combos. The {len(world.heldout_combos())}
   held-out combos (`world.heldout_combos()`) are never seen.

{stopped}

Hardware: {hw["device"]} only ({hw["cpu"]}, {hw["torch_threads"]} torch threads, shared with
other jobs), torch {hw["torch"]}. Wall time of the whole run to this checkpoint (both phases):
{record["wall_time_s"] / 60:.0f} minutes. Losses (mean of every 50 steps) are in `training.json`.

## Measured adherence

On all {measured["prompts"]} held-out prompts, one render each (seeds 1234+i), at the defaults,
read back from pixels by `finetune.metrics.prompt_adherence`:
background color {measured["bg"]:.0%}, foreground color {measured["fg"]:.0%},
shape {measured["shape"]:.0%} (chance: {1 / len(world.COLORS):.0%}, {1 / len(world.COLORS):.0%},
{1 / len(world.SHAPES):.0%}).

## Limits

It knows only its world: seven colors, three shapes, one composition. Anything else it renders
as some shape on some background. It was trained only on captions that start with the
description, so words in front of it (a brand's `acme style, ...`) shift the positions it reads
colors from and it often draws the wrong colors for such prompts; a brand LoRA trained on
captions of that form corrects this (see `tests/finetune/test_lora_brand.py`).
"""
    (model_dir / "README.md").write_text(card)
    return model_dir / "README.md"


def _parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.base_model",
        description="Train the built-in shapes base model from scratch and save it as a "
        "diffusers StableDiffusionPipeline.",
    )
    parser.add_argument("--out", required=True, type=Path, help="Folder to save the pipeline to.")
    parser.add_argument(
        "--steps", type=int, default=6000, help="Diffusion training steps (UNet + text encoder)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of data, init and noise.")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per training step.")
    parser.add_argument(
        "--vae-steps", type=int, default=BaseModelConfig.vae_steps, help="Autoencoder steps."
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="Save a full pipeline every N steps (0: only at the end).",
    )
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="Where intermediate pipelines go."
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)."
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()

    def report(phase: str, step: int, total: int, loss: float) -> None:
        if step % 50 == 0 or step == total:
            rate = step / max(1e-9, time.monotonic() - started)
            print(f"{phase} {step}/{total} loss={loss:.4f} ({rate:.2f} it/s overall)", flush=True)

    config = BaseModelConfig(vae_steps=args.vae_steps)
    out = train_base_model(
        args.out,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        config=config,
        checkpoint_every=args.checkpoint_every,
        checkpoint_dir=args.checkpoint_dir,
        progress=report,
    )
    card = write_model_card(out)
    print(f"saved {out} (model card: {card})")


if __name__ == "__main__":
    main()
