"""Does the order a request lists its adapters in change the pixels?

Renders three random adapters combined (scales 1, 0.7, 0.5) in all 6 orders, 4 seeds, 32x32,
20 steps, on the engine alone (no Ray), and prints the largest 8-bit difference from the first
order and how many renders differ: once with the engine as built (deltas summed in model-id
order) and once with a variant that sums them in the request's order, to show what the
canonical order buys. Run from the repo root:

    python bench/adapter_order.py

docs/benchmarks.md ("Several adapters per render") records what it printed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.synthetic_lora import random_lora_bytes
from registry.base_models import SHAPES, ensure_base_model, load_pipeline
from serve.adapter_cache import parse_weights
from serve.engine import DiffusionEngine, denoise
from serve.protocol import AdapterSpec, RenderJob

PROMPT = "a red circle on a blue background"
SCALES = (1.0, 0.7, 0.5)


class RequestOrderEngine(DiffusionEngine):
    """The engine, but adding a row's LoRA deltas in the order the request listed them."""

    def _row_state(self, job: RenderJob, index: int) -> denoise.RowState:
        return denoise.start_row(
            self.pipeline,
            self.slots.router,
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            width=job.width,
            height=job.height,
            steps=job.steps,
            guidance_scale=job.guidance_scale,
            seed=job.seeds[index],
            slots=tuple(self.slots.slot_name(s.model_id) for s in job.adapters),
            scales=tuple(s.scale for s in job.adapters),
        )


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-order-") as tmp:
        model = ensure_base_model(SHAPES, Path(tmp), 1024)
        unet = load_pipeline(model, "cpu").unet
        adapters = []
        for i in range(3):
            data = random_lora_bytes(unet, seed=20 + i)
            digest = hashlib.sha256(data).hexdigest()
            spec = AdapterSpec("t1", f"b{i}", 1, 1.0, digest, "s3://x", f"b{i}")
            adapters.append((spec, parse_weights(spec, data)))
        for cls in (DiffusionEngine, RequestOrderEngine):
            engine = cls.load(model, "cpu", max_adapters=3, max_batch_images=4)
            worst = differing = total = 0
            for seed in range(4):
                images = []
                for order in itertools.permutations(range(3)):
                    specs = tuple(
                        dataclasses.replace(adapters[j][0], scale=SCALES[j]) for j in order
                    )
                    job = RenderJob(PROMPT, None, 32, 32, 20, 4.0, (seed,)).with_adapters(specs)
                    png = engine.generate(job, [adapters[j][1] for j in order])[0].png
                    images.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
                diffs = [int(np.abs(im.astype(int) - images[0]).max()) for im in images[1:]]
                worst = max(worst, *diffs)
                differing += sum(d > 0 for d in diffs)
                total += len(diffs)
            engine.close()
            print(f"{cls.__name__}: max difference {worst}/255, {differing} of {total} differ")


if __name__ == "__main__":
    main()
