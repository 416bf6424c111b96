"""Editing on one engine: memory and time of each kind of edit next to a plain render.

Loads the built-in model into one engine (as a replica does), renders once to warm up, and
records the process's RSS; then runs one of each edit (inpainting, img2img, 2x upscale, an
8-frame interpolation) and records the RSS again: edits reuse the pipeline's own components,
so neither the live torch parameters nor the RSS may grow by a copy of the weights (both
printed, the RSS after warm-up renders of the same shapes). Run from the repo
root (about a minute on an idle 2-core CPU):

    python bench/edits.py

docs/benchmarks.md ("Editing") records what it printed.
"""

from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageDraw

from finetune import world
from registry.base_models import SHAPES, ensure_base_model
from serve import canvas
from serve.engine import DiffusionEngine
from serve.protocol import RenderJob, RowMix, SourceImage


def rss_mib() -> float:
    """The process's resident set now (Linux /proc), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def parameter_bytes() -> int:
    """Bytes of every live torch Parameter in the process: a second copy of the model (a second
    pipeline, an inpainting UNet) would add its weights here."""
    import gc

    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Parameter) and id(obj) not in seen:
            seen.add(id(obj))
            total += obj.numel() * obj.element_size()
    return total


def timed(engine: DiffusionEngine, job: RenderJob) -> float:
    started = time.perf_counter()
    engine.generate(job)
    return time.perf_counter() - started


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = ensure_base_model(SHAPES, Path(tmp), 1024)
        engine = DiffusionEngine.load(model, "cpu", max_batch_images=8)
    weights = sum(
        p.numel() * p.element_size()
        for part in (engine.pipeline.unet, engine.pipeline.vae, engine.pipeline.text_encoder)
        for p in part.parameters()
    )
    source = Image.new("RGB", (32, 32), world.PALETTE["blue"])
    ImageDraw.Draw(source).ellipse((8, 8, 23, 23), fill=world.PALETTE["red"])
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 23, 23), fill=255)
    src, msk = canvas.png_bytes(source), canvas.png_bytes(mask)
    prompt = "a green square on a blue background"
    plain = RenderJob(prompt, None, 32, 32, 20, 4.0, (1,))
    frames = 8
    # Warm-up: plain renders of every shape the edits below use (1 image at 32 and 64 pixels,
    # 8 images at 32), so that the allocator's caches for those activations already exist.
    for warm in (plain, replace(plain, width=64, height=64), replace(plain, seeds=tuple(range(8)))):
        engine.generate(warm)
    before, params_before = rss_mib(), parameter_bytes()
    mixes = tuple(
        RowMix(((prompt, 1 - i / 7), ("a red circle on a yellow background", i / 7)), 9, i / 7)
        for i in range(frames)
    )
    times = {
        "text-to-image, 1 image": timed(engine, plain),
        "inpaint (mask), 1 image": timed(engine, replace(plain, source=SourceImage(src, msk, 1.0))),
        "img2img strength 0.6, 1 image": timed(
            engine, replace(plain, source=SourceImage(src, None, 0.6))
        ),
        "upscale 32->64 strength 0.35, 1 image": timed(
            engine,
            replace(plain, width=64, height=64, source=SourceImage(src, None, 0.35)),
        ),
        "interpolation, 8 frames": timed(engine, replace(plain, seeds=(1,) * frames, mixes=mixes)),
    }
    after, params_after = rss_mib(), parameter_bytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"weights (UNet + VAE + text encoder): {weights / 2**20:.1f} MiB")
    print(
        f"live torch parameters: {params_before / 2**20:.1f} MiB before the edits, "
        f"{params_after / 2**20:.1f} MiB after"
    )
    print(
        f"RSS after warm-up render: {before:.1f} MiB; after the edits: {after:.1f} MiB "
        f"(+{after - before:.1f}); peak {peak:.1f} MiB"
    )
    for name, seconds in times.items():
        print(f"{name}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
