"""The diffusion engine: owns one diffusers pipeline and turns a `RenderJob` into PNG bytes.

Plain Python: no Ray, no FastAPI. The Ray Serve replica wraps it; tests, benchmarks and GPU
boxes without Ray use it directly.
"""

from __future__ import annotations

import io
import json
import threading

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from registry.base_models import BaseModelInfo, load_pipeline, select_device
from serve.protocol import RenderedImage, RenderJob


def encode_png(image: Image.Image, metadata: dict[str, str | int | float | None]) -> bytes:
    """PNG bytes with each metadata item as a tEXt chunk, plus all of it as JSON `parameters`."""
    info = PngInfo()
    for key, value in metadata.items():
        if value is not None:
            info.add_text(key, str(value))
    info.add_text("parameters", json.dumps(metadata, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


class DiffusionEngine:
    """Renders jobs on one pipeline. One job at a time: a pipeline is not re-entrant."""

    def __init__(self, pipeline, model: BaseModelInfo, device: str) -> None:
        self.pipeline = pipeline
        self.model = model
        self.device = device
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model: BaseModelInfo, device: str = "auto") -> DiffusionEngine:
        resolved = select_device(device)
        return cls(load_pipeline(model, resolved), model, resolved)

    def generate(self, job: RenderJob) -> list[RenderedImage]:
        """Render every image of the job. Each image is rendered on its own from its own seed,
        so its pixels depend only on (prompt, parameters, seed), never on `n` or batch-mates."""
        import torch

        images: list[RenderedImage] = []
        with self._lock, torch.inference_mode():
            for seed in job.seeds:
                # A CPU generator gives the same initial noise on every device.
                generator = torch.Generator("cpu").manual_seed(seed)
                out = self.pipeline(
                    prompt=job.prompt,
                    negative_prompt=job.negative_prompt,
                    width=job.width,
                    height=job.height,
                    num_inference_steps=job.steps,
                    guidance_scale=job.guidance_scale,
                    generator=generator,
                    output_type="pil",
                )
                meta = {
                    "prompt": job.prompt,
                    "negative_prompt": job.negative_prompt,
                    "seed": seed,
                    "steps": job.steps,
                    "guidance_scale": job.guidance_scale,
                    "width": job.width,
                    "height": job.height,
                    "base_model": self.model.id,
                    "base_model_revision": self.model.revision,
                }
                images.append(RenderedImage(png=encode_png(out.images[0], meta), seed=seed))
        return images
