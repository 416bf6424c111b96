"""What provenance costs and how far the watermark carries, on the built-in model's renders.

    PYTHONPATH=$PWD python bench/provenance.py [--images 6] [--model]

Takes `--images` images at each size the built-in model renders (32, 64, 128 px): scenes of the
built-in world it was trained on (`finetune.world`, as PNGs with generation parameters, as the
engine makes them), or with `--model` real renders of `brandfarm-shapes` on the CPU (about 4 s
at 32 px and 30 s at 64 px each on a busy 2-core box). Then prints two tables
(docs/benchmarks.md, "Provenance"):

1. Per output format and size: the bytes and milliseconds the watermark and the signed C2PA
   manifest add to the plain encoded file (median over the images).
2. The watermark's bit accuracy (share of the 48 payload bits read back) and detection rate
   (payload found with its check bits, by `serve.watermark.detect`) on clean outputs and after
   JPEG q80, WebP q80, a 0.5x resize and a 10% crop (5% off each side). Renders under 256x256
   carry no watermark (the library's minimum), so each render is also upscaled to 256 and 512 px
   before it is marked, as a larger render of the same content would be.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from finetune import world
from registry.base_models import ensure_base_model
from registry.settings import Settings
from serve import watermark
from serve.engine import DiffusionEngine
from serve.image_formats import encode_image, read_parameters
from serve.outputs import OutputEncoder
from serve.protocol import RenderJob

PROMPTS = ("a red circle on a blue background", "a green square", "a yellow triangle on white")


def scenes(size: int, n: int) -> list[bytes]:
    rng = random.Random(size)
    out = []
    for i in range(n):
        combo = rng.choice(world.all_combos())
        params = {"prompt": world.caption(combo), "seed": i, "base_model": "brandfarm-shapes"}
        out.append(encode_image(world.render(world.sample_scene(rng, combo), size), "png", params))
    return out


def renders(engine: DiffusionEngine, size: int, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        job = RenderJob(
            prompt=PROMPTS[i % len(PROMPTS)],
            negative_prompt=None,
            width=size,
            height=size,
            steps=engine.model.default_steps,
            guidance_scale=engine.model.default_guidance_scale,
            seeds=(i,),
        )
        out.append(engine.generate(job)[0].png)
    return out


def overhead_table(encoder: OutputEncoder, pngs: dict[int, list[bytes]]) -> None:
    print("\n## Overhead per image (median): plain file vs watermarked + signed output")
    print("| format | size | plain bytes | output bytes | added bytes | plain ms | output ms |")
    print("|---|---|---|---|---|---|---|")
    for fmt in ("png", "jpeg", "webp"):
        for size, images in pngs.items():
            plain_b, out_b, plain_ms, out_ms = [], [], [], []
            for i, png in enumerate(images):
                image = Image.open(io.BytesIO(png))
                params = read_parameters(image) or {}
                t = time.perf_counter()
                plain = encode_image(image.convert("RGB"), fmt, params)
                plain_ms.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                out = encoder.encode(
                    png, tenant="bench", render_id="bench", index=i, output_format=fmt
                )
                out_ms.append((time.perf_counter() - t) * 1000)
                plain_b.append(len(plain))
                out_b.append(len(out.data))
            pb, ob = statistics.median(plain_b), statistics.median(out_b)
            print(
                f"| {fmt} | {size} | {pb:.0f} | {ob:.0f} | {ob - pb:+.0f} | "
                f"{statistics.median(plain_ms):.1f} | {statistics.median(out_ms):.1f} |"
            )


def _recode(fmt: str) -> Callable[[Image.Image], Image.Image]:
    def run(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, format=fmt, quality=80)
        return Image.open(buf).convert("RGB")

    return run


def _half(img: Image.Image) -> Image.Image:
    return img.resize((img.width // 2, img.height // 2), Image.Resampling.BICUBIC)


def _crop10(img: Image.Image) -> Image.Image:
    dx, dy = round(img.width * 0.05), round(img.height * 0.05)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "clean": lambda img: img,
    "jpeg q80": _recode("JPEG"),
    "webp q80": _recode("WEBP"),
    "0.5x resize": _half,
    "10% crop": _crop10,
}


def _accuracy(img: Image.Image, payload: bytes) -> float:
    """Bit accuracy as `detect` would read it: as given, and at 2x when that finds the payload
    (a halved image); an image too small to read counts as 0.5 (chance)."""
    best = None
    for factor in (1, 2):
        candidate = img if factor == 1 else img.resize((img.width * 2, img.height * 2))
        bits = watermark.read_bits(np.asarray(candidate))
        if bits is not None:
            acc = watermark.bit_accuracy(bits, payload)
            best = acc if best is None else max(best, acc)
    return 0.5 if best is None else best


def watermark_table(encoder: OutputEncoder, pngs: dict[int, list[bytes]]) -> None:
    print("\n## Watermark: bit accuracy / detection rate (payload found with its check bits)")
    print("| render | marked at | " + " | ".join(TRANSFORMS) + " | PSNR dB |")
    print("|---|---|" + "---|" * (len(TRANSFORMS) + 1))
    for size, images in pngs.items():
        for side in sorted({size, 256, 512}):
            cells: dict[str, list[tuple[float, bool]]] = {t: [] for t in TRANSFORMS}
            psnr = []
            for i, png in enumerate(images):
                image = Image.open(io.BytesIO(png)).convert("RGB")
                if side != size:
                    image = image.resize((side, side), Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                rid = f"wm{size}-{side}-{i}"
                out = encoder.encode(buf.getvalue(), tenant="bench", render_id=rid, index=0)
                payload = watermark.payload_for(rid, 0)
                marked = Image.open(io.BytesIO(out.data)).convert("RGB")
                err = np.asarray(marked, float) - np.asarray(image, float)
                mse = float((err**2).mean())
                psnr.append(99.0 if mse == 0 else 10 * np.log10(255**2 / mse))
                for name, transform in TRANSFORMS.items():
                    seen = transform(marked)
                    found = watermark.detect(np.asarray(seen)).payload == payload.hex()
                    cells[name].append((_accuracy(seen, payload), found))
            row = [
                f"{statistics.mean(a for a, _ in v):.3f} / {sum(f for _, f in v)}/{len(v)}"
                for v in cells.values()
            ]
            label = f"{side}px" + (" (native)" if side == size else " (upscaled)")
            if not watermark.carries_watermark(side, side):
                label, row = f"{side}px: not carried", ["-"] * len(TRANSFORMS)
            print(
                f"| {size}px | {label} | " + " | ".join(row) + f" | {statistics.mean(psnr):.1f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=6, help="Images per size.")
    parser.add_argument("--model", action="store_true", help="Real renders of the model.")
    parser.add_argument("--sizes", default="32,64,128", help="Comma-separated sides.")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(state_dir=Path(tmp) / "state")
        encoder = OutputEncoder.from_settings(settings)
        if args.model:
            model = ensure_base_model(
                settings.base_model, Path(tmp) / "models", settings.max_image_side
            )
            engine = DiffusionEngine.load(model, "cpu")
            pngs = {size: renders(engine, size, args.images) for size in sizes}
            engine.close()
            source = f"renders of {model.id}"
        else:
            pngs = {size: scenes(size, args.images) for size in sizes}
            source = "built-in world scenes"
        print(f"# bench/provenance.py: {args.images} {source} per size", flush=True)
        overhead_table(encoder, pngs)
        watermark_table(encoder, pngs)


if __name__ == "__main__":
    main()
