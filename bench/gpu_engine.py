"""Render throughput of one replica's pipeline on a GPU: 1 brand adapter vs. 8 adapters rotating.

An SD-1.5-architecture pipeline (UNet 860M, CLIP ViT-L text encoder, SD VAE) is built from its
config with random weights (nothing is downloaded), placed by the farm's device plan
(`registry.device_plan`: fp16 by default, SDPA attention, components spread when several GPUs are
visible), and renders 512x512 images one at a time, as a replica does. Brand adapters are random
rank-8 LoRAs on the UNet's attention projections, loaded with diffusers'
`pipe.load_lora_weights(state_dict, adapter_name=...)` and activated with
`pipe.set_adapters([name], [scale])`: "1 adapter" keeps one active; "8 rotating" activates a
different resident adapter before every image, the hot-swap pattern of mixed tenant traffic.

Then the batching engine's step (`serve.engine.denoise`, what a replica runs with
`max_batch_images` > 1): images/s at batch sizes 1/4/8/16 with one adapter, and a batch with
all adapters mixed (row i uses adapter i mod 8, routed per row through peft's `adapter_names`)
against the same batch size with one adapter. The GPU runs batches without the CPU's
same-shape padding (`exact_batch_pixels`): its kernels are not bit-identical across shapes.

Needs torch, diffusers, transformers, peft and accelerate (and this repo's `serve.engine`, which
imports pydantic); no Ray, MLflow or network.

    python bench/gpu_engine.py                      # CUDA, SD-1.5 shapes, 512x512, fp16
    python bench/gpu_engine.py --tiny --images 2    # CPU smoke test of the same code path
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from registry.base_models import TINY_SD_SHAPES, random_sd_pipeline  # noqa: E402
from registry.device_plan import (  # noqa: E402
    component_bytes,
    dispatch_plan,
    plan_devices,
    visible_devices,
)

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PROMPT = "a red circle on a blue background, acme style"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="Tiny config at 64x64 (a CPU smoke test)."
    )
    parser.add_argument("--device", default=None, help="cpu, cuda (all GPUs) or cuda:<i>.")
    parser.add_argument(
        "--dtype",
        choices=["float16", "bfloat16"],
        default="float16",
        help="Weights' dtype on CUDA (CPU always runs float32).",
    )
    parser.add_argument("--size", type=int, default=None, help="Image side (512; tiny: 64).")
    parser.add_argument("--steps", type=int, default=None, help="Denoising steps (25; tiny: 2).")
    parser.add_argument("--images", type=int, default=16, help="Images timed per mode.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed images per mode.")
    parser.add_argument("--adapters", type=int, default=8, help="Adapters in the rotation.")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of each adapter.")
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=[1, 4, 8, 16],
        help="Batch sizes (images per denoising step) for the batching engine.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of weights and adapters.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = parser.parse_args(argv)
    # Sanity checks.
    if args.device is None:
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    args.size = args.size or (64 if args.tiny else 512)
    args.steps = args.steps or (2 if args.tiny else 25)
    if args.size % 8:
        parser.error(f"--size {args.size} must be a multiple of 8")
    if args.images < 1 or args.adapters < 1:
        parser.error("--images and --adapters must be at least 1")
    return args


#: Stable Diffusion 1.5's component shapes (UNet 860M, CLIP ViT-L text encoder, SD VAE).
SD15_SHAPES: dict[str, dict] = {
    "text_encoder": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    "unet": {
        "sample_size": 64,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "norm_num_groups": 32,
    },
}
SD15_VOCAB = 49408  # CLIP's vocabulary size: the text encoder's embedding table as in SD 1.5


def build_pipeline(tiny: bool, seed: int):
    """SD-1.5 shapes (or tiny-sd-random's) with random weights, in float32 on the CPU."""
    if tiny:
        return random_sd_pipeline(TINY_SD_SHAPES, seed)
    return random_sd_pipeline(SD15_SHAPES, seed, vocab_size=SD15_VOCAB)


def random_lora(unet: torch.nn.Module, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA state dict in the format fine-tunes write (peft keys under `unet.`), random."""
    generator = torch.Generator("cpu").manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS):
            down = torch.randn(rank, module.in_features, generator=generator) / rank
            up = torch.randn(module.out_features, rank, generator=generator) * 0.01
            state[f"unet.{name}.lora_A.weight"] = down
            state[f"unet.{name}.lora_B.weight"] = up
    if not state:
        raise ValueError(f"no {LORA_TARGETS} layers found: is a LoRA already injected?")
    return state


def sync(devices: list[str]) -> None:
    for device in devices:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)


def render_rate(pipe, args, devices: list[str], choose_adapter) -> float:
    """Images per second over `args.images` images, after `args.warmup` untimed ones."""

    def one(i: int) -> None:
        choose_adapter(i)
        pipe(
            PROMPT,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            guidance_scale=5.0,
            generator=torch.Generator("cpu").manual_seed(i),
            output_type="pil",
        )

    for i in range(args.warmup):
        one(i)
    sync(devices)
    start = time.perf_counter()
    for i in range(args.images):
        one(i)
    sync(devices)
    return args.images / (time.perf_counter() - start)


def batched_rate(pipe, args, devices: list[str], router, batch: int, slots: list[str]) -> float:  # noqa: ANN001
    """Images per second of the batching engine's step at `batch` images per step, row i with
    adapter `slots[i % len(slots)]`; at least `args.images` images, after one untimed batch."""
    from serve.engine import denoise

    def run(first_seed: int) -> None:
        rows = [
            denoise.start_row(
                pipe,
                router,
                prompt=PROMPT,
                negative_prompt=None,
                width=args.size,
                height=args.size,
                steps=args.steps,
                guidance_scale=5.0,
                seed=first_seed + i,
                slots=(slots[i % len(slots)],),
                scales=(1.0,),
            )
            for i in range(batch)
        ]
        while not rows[0].done:
            denoise.step(pipe, router, rows)
        for row in rows:
            denoise.decode(pipe, row)

    with torch.inference_mode():
        run(0)
        sync(devices)
        start = time.perf_counter()
        done = 0
        while done < max(args.images, batch):
            run(done)
            done += batch
        sync(devices)
    return done / (time.perf_counter() - start)


def hardware(devices: list[str]) -> str:
    if devices == ["cpu"]:
        return f"{platform.processor() or platform.machine()} CPU"
    names = [torch.cuda.get_device_name(torch.device(d)) for d in devices]
    return ", ".join(f"{d} {n}" for d, n in zip(devices, names, strict=True))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    # Build the pipeline and place it by the farm's device plan.
    devices = visible_devices(args.device)
    pipe = build_pipeline(args.tiny, args.seed)
    pipe.set_progress_bar_config(disable=True)
    plan = plan_devices(component_bytes(pipe), devices, bf16_supported=args.dtype == "bfloat16")
    for name in plan.placement:
        getattr(pipe, name).to(getattr(torch, plan.dtype))
    pipe = dispatch_plan(pipe, plan)

    # Make the brand adapters from the bare UNet, then load them (each stays resident).
    names = [f"brand{i}" for i in range(args.adapters)]
    states = [random_lora(pipe.unet, args.rank, args.seed + 1 + i) for i in range(len(names))]
    load_s = []
    for name, state in zip(names, states, strict=True):
        start = time.perf_counter()
        pipe.load_lora_weights(state, adapter_name=name)
        sync(devices)
        load_s.append(time.perf_counter() - start)

    # Time the two traffic patterns.
    one = render_rate(pipe, args, devices, lambda i: pipe.set_adapters([names[0]], [1.0]))
    rotating = render_rate(
        pipe, args, devices, lambda i: pipe.set_adapters([names[i % len(names)]], [1.0])
    )

    # The batching engine: one adapter at several batch sizes, then all adapters mixed.
    from serve.engine.adapters import LoraRouter

    router = LoraRouter(pipe)
    router.refresh()
    batched = {b: batched_rate(pipe, args, devices, router, b, names[:1]) for b in args.batches}
    widest = max(args.batches)
    mixed = batched_rate(pipe, args, devices, router, widest, names)

    result = {
        "pipeline": "tiny-sd" if args.tiny else "sd-1.5 (random weights)",
        "size": args.size,
        "steps": args.steps,
        "dtype": plan.dtype,
        "placement": plan.placement,
        "hardware": hardware(devices),
        "torch": torch.__version__,
        "images_per_mode": args.images,
        "adapter_load_s_median": sorted(load_s)[len(load_s) // 2],
        "images_per_s_1_adapter": round(one, 4),
        f"images_per_s_{len(names)}_rotating": round(rotating, 4),
        "rotating_vs_1": round(rotating / one, 4),
        "batched_images_per_s_1_adapter": {str(b): round(r, 4) for b, r in batched.items()},
        f"batched_images_per_s_{len(names)}_mixed_at_{widest}": round(mixed, 4),
        "batched_mixed_vs_1_adapter": round(mixed / batched[widest], 4),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
