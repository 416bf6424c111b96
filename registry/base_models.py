"""Base-model catalog and loading: which diffusers pipeline a farm renders with, and its rules.

A base model is a catalog id (built-in models), a local diffusers folder, or a hub id. Reading a
model's rules (native size, size multiple, defaults, revision) needs only its JSON configs, so
the API ingress can validate requests without importing torch; only `build_*` and
`load_pipeline` import torch/diffusers, lazily.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

BUILTIN_DIR = Path(__file__).parent / "builtin"
TINY_RANDOM = "tiny-sd-random"
SHAPES = "brandfarm-shapes"
DEFAULTS_FILES = ("brandfarm.json", "training.json")  # optional per-model defaults


class BaseModelError(RuntimeError):
    """A base model could not be found, built or described."""


@dataclass(frozen=True)
class BaseModelInfo:
    """What the API and the engine need to know about a base model, read from its configs."""

    id: str
    path: str  # local folder holding `model_index.json`
    revision: str  # sha256 over the folder's files: the exact weights rendered with
    native_size: int  # the side the denoiser was built for, in pixels
    size_multiple: int  # width and height must be multiples of this
    max_side: int  # the largest width/height this model accepts
    default_steps: int
    default_guidance_scale: float

    def to_dict(self) -> dict:
        return asdict(self)


def _folder_revision(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BaseModelError(f"cannot read {path}: {e}") from e


def describe(model_id: str, folder: Path, max_image_side: int) -> BaseModelInfo:
    """Read a diffusers folder's rules without loading weights."""
    if not (folder / "model_index.json").is_file():
        raise BaseModelError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    vae = _read_json(folder / "vae" / "config.json")
    denoiser_dir = folder / "unet" if (folder / "unet").is_dir() else folder / "transformer"
    denoiser = _read_json(denoiser_dir / "config.json")
    vae_scale = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    down_factor = 2 ** (len(denoiser.get("block_out_channels", [0])) - 1)
    sample = denoiser.get("sample_size", 64)
    sample = sample[0] if isinstance(sample, list | tuple) else sample
    native = int(sample) * vae_scale
    multiple = max(8, vae_scale * down_factor)
    defaults: dict = {}
    for name in DEFAULTS_FILES:
        if (folder / name).is_file():
            defaults = _read_json(folder / name)
            break
    return BaseModelInfo(
        id=model_id,
        path=str(folder),
        revision=_folder_revision(folder),
        native_size=int(defaults.get("default_size", native)),
        size_multiple=multiple,
        max_side=min(max_image_side, 4 * native),
        default_steps=int(defaults.get("default_steps", 25)),
        default_guidance_scale=float(defaults.get("default_guidance_scale", 7.5)),
    )


def _catalog_folder(model_id: str, models_dir: Path) -> Path | None:
    """Where a catalog id lives: shipped in the package, or built into the state dir."""
    if model_id == TINY_RANDOM:
        return models_dir / TINY_RANDOM
    shipped = BUILTIN_DIR / model_id
    if (shipped / "model_index.json").is_file():
        return shipped
    return None


def ensure_base_model(name: str, models_dir: Path, max_image_side: int) -> BaseModelInfo:
    """Resolve `name` to a local folder (building the tiny random model once if asked for it,
    downloading a hub id once if the hub is reachable) and describe it."""
    folder = _catalog_folder(name, models_dir)
    if folder is not None:
        if name == TINY_RANDOM and not (folder / "model_index.json").is_file():
            build_tiny_random_sd(folder)
        return describe(name, folder, max_image_side)
    local = Path(name).expanduser()
    if local.is_dir():
        return describe(name, local.resolve(), max_image_side)
    if "/" in name and not name.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(name, allow_patterns=["*.json", "*.txt", "*.safetensors"])
        except Exception as e:  # noqa: BLE001 - any hub failure has the same remedy
            raise BaseModelError(
                f"base model {name!r} is neither a catalog id, nor a local folder, and could "
                f"not be fetched from the hub ({e}); set BRANDFARM_BASE_MODEL to a local "
                f"diffusers folder or one of: {', '.join(catalog_ids())}"
            ) from e
        return describe(name, Path(path), max_image_side)
    raise BaseModelError(
        f"unknown base model {name!r}: use a local diffusers folder, a hub id, or one of: "
        f"{', '.join(catalog_ids())}"
    )


def catalog_ids() -> list[str]:
    shipped = sorted(p.parent.name for p in BUILTIN_DIR.glob("*/model_index.json"))
    return [*shipped, TINY_RANDOM]


def _byte_level_clip_tokenizer(max_length: int):
    """A CLIP BPE tokenizer over single byte-characters (no merges): built by us, no download."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=max_length
    )


#: Component shapes of `tiny-sd-random` (also the GPU benchmark's `--tiny` pipeline).
TINY_SD_SHAPES: dict[str, dict] = {
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
    "unet": {
        "sample_size": 32,
        "layers_per_block": 1,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
    },
    "vae": {
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (16, 32),
        "norm_num_groups": 16,
        "sample_size": 64,
    },
}


def random_sd_pipeline(shapes: dict[str, dict], seed: int = 0, vocab_size: int | None = None):
    """A Stable-Diffusion-architecture pipeline with random weights, built from the component
    shapes given (`TINY_SD_SHAPES` or, e.g., SD 1.5's), our byte-level tokenizer and DDIM; no
    download. `vocab_size` defaults to the tokenizer's."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _byte_level_clip_tokenizer(max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size or len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **shapes["text_encoder"],
        )
    )
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **shapes["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **shapes["vae"])
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_random_sd(out_dir: Path, seed: int = 0) -> Path:
    """`tiny-sd-random`: `TINY_SD_SHAPES` with random weights (64x64 images), written with
    `save_pretrained` so that it is always loaded through the real `from_pretrained` path."""
    pipe = random_sd_pipeline(TINY_SD_SHAPES, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so a crash never leaves a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        pipe.save_pretrained(tmp)
        (tmp / "brandfarm.json").write_text(
            json.dumps(
                {
                    "description": "random weights, built from config for tests and offline use",
                    "seed": seed,
                    "default_steps": 10,
                    "default_guidance_scale": 5.0,
                    "default_size": 64,
                },
                indent=2,
            )
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def select_device(preference: str = "auto") -> str:
    """`cuda` when asked or available (auto), else `cpu`."""
    import torch

    if preference == "cuda" and not torch.cuda.is_available():
        raise BaseModelError("device=cuda was configured but CUDA is not available")
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


def load_pipeline(info: BaseModelInfo, device: str):
    """Load the pipeline onto `device` following a device plan (`registry.device_plan`).

    `cpu`: float32, everything on the CPU. `cuda`: every GPU this process sees (a Ray replica
    with k GPUs sees its own k); `cuda:<i>`: that one. On CUDA the weights are bfloat16 where the
    GPU supports it, else float16; with several GPUs the denoiser gets the first and the other
    components are balanced by size over the rest (accelerate hooks move tensors between them).
    Attention runs through torch's SDPA.
    """
    import torch
    from diffusers import DiffusionPipeline

    from registry.device_plan import (
        component_bytes,
        dispatch_plan,
        plan_devices,
        plan_dtype,
        visible_devices,
    )

    devices = visible_devices(device)
    bf16 = devices != ["cpu"] and torch.cuda.is_bf16_supported()
    dtype = plan_dtype(devices, bf16)
    pipe = DiffusionPipeline.from_pretrained(info.path, dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    return dispatch_plan(pipe, plan_devices(component_bytes(pipe), devices, bf16))
