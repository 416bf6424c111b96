"""Largest pixel difference between solo and batched renders, with and without exact batching.

Renders three random brand adapters plus the base model at two scales, first one image at a
time, then all at once (full batches, mixed brands), on the engine alone (no Ray), and prints
the largest 8-bit difference and how many images differ. Run from the repo root:

    python bench/batch_identity.py                 # built-in model, CPU, both modes
    python bench/batch_identity.py --threads 2     # what more torch threads do
    python bench/batch_identity.py --size 64       # another image size

docs/architecture.md ("Pixel identity") records what it printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.synthetic_lora import random_lora_bytes
from registry.base_models import SHAPES, ensure_base_model
from serve.adapter_cache import parse_weights
from serve.engine import DiffusionEngine
from serve.protocol import AdapterSpec, RenderJob


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SHAPES, help="base model id (catalog) or folder")
    p.add_argument("--batch", type=int, default=8, help="max_batch_images")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per image")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    model = ensure_base_model(args.model, Path(tempfile.mkdtemp()), 1024)
    side = args.size or model.native_size
    for exact in (True, False):
        engine = DiffusionEngine.load(
            model,
            "cpu",
            4,
            max_batch_images=args.batch,
            exact_pixels=exact,
            cpu_threads=args.threads,
        )
        adapters = {}
        for i in range(3):
            data = random_lora_bytes(engine.pipeline.unet, seed=i)
            spec = AdapterSpec("t", f"b{i}", 1, 1.0, hashlib.sha256(data).hexdigest(), "-", "-")
            adapters[f"b{i}"] = (spec, parse_weights(spec, data))

        def job(brand, scale, seed, adapters=adapters):
            spec = None if brand is None else dataclasses.replace(adapters[brand][0], scale=scale)
            prompt = "a red circle on a blue background"
            job = RenderJob(prompt, None, side, side, args.steps, 4.0, (seed,), spec)
            return job, None if brand is None else adapters[brand][1]

        work = [(None, 1.0, s) for s in (1, 2)]
        work += [(b, sc, s) for b in adapters for sc in (1.0, 0.5) for s in (1, 2)]

        def px(images):
            return np.asarray(Image.open(io.BytesIO(images[0].png)).convert("RGB")).astype(int)

        started = time.perf_counter()
        solo = {w: px(engine.generate(*job(*w))) for w in work}
        solo_s = time.perf_counter() - started
        started = time.perf_counter()
        futures = {w: engine.submit(*job(*w)) for w in work}
        batched = {w: px(f.result()) for w, f in futures.items()}
        batched_s = time.perf_counter() - started
        diffs = {w: int(np.abs(batched[w] - solo[w]).max()) for w in work}
        base = [diffs[w] for w in work if w[0] is None]
        print(
            f"exact_pixels={exact} threads={args.threads} batch={args.batch} size={side}: "
            f"max difference {max(diffs.values())}/255 (base-model rows {max(base)}), "
            f"{sum(d > 0 for d in diffs.values())} of {len(work)} images differ; "
            f"solo {solo_s:.1f} s, batched {batched_s:.1f} s"
        )
        engine.close()


if __name__ == "__main__":
    main()
