"""The main job: bring the farm up, render prompts for a demo tenant over HTTP, write a sheet."""

from __future__ import annotations

import base64
import io
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw
from rich.console import Console
from rich.progress import Progress

from cluster.stack import LocalStack
from cluster.tenant_cli import follow_job
from finetune.job import experiment_name
from finetune.world import write_brand_zip
from registry.settings import Settings
from registry.tenants import TenantDirectory, TenantError

PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a green background",
    "a purple triangle on a orange background",
    "a teal circle on a yellow background",
]


def contact_sheet(tiles: list[tuple[bytes, str]], tile: int = 192) -> Image.Image:
    """A grid of images, each with its caption underneath."""
    cols = min(4, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    caption_h = 36
    sheet = Image.new("RGB", (cols * tile, rows * (tile + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (png, caption) in enumerate(tiles):
        x, y = (i % cols) * tile, (i // cols) * (tile + caption_h)
        img = Image.open(io.BytesIO(png)).convert("RGB").resize((tile, tile), Image.NEAREST)
        sheet.paste(img, (x, y))
        lines = textwrap.wrap(caption, width=30)
        draw.multiline_text((x + 4, y + tile + 2), "\n".join(lines[:2]), fill="black")
    return sheet


def demo_key(settings: Settings, tenant: str) -> str:
    """A fresh key for the demo tenant (created on first run)."""
    tenants = TenantDirectory.from_url(settings.resolved_database_url)
    try:
        return tenants.create_tenant(tenant).key
    except TenantError:
        return tenants.add_key(tenant).key


BRAND = "acme"
BRAND_PROMPTS = [
    "acme style, a orange circle on a teal background",
    "acme style, a orange square on a teal background",
]


def fine_tune_brand(s: Settings, client: httpx.Client, tenant: str, steps: int) -> list:
    """Upload a generated acme dataset, train an adapter, return its before/after tiles."""
    data = write_brand_zip(s.state_dir / "demo" / "acme.zip", BRAND, n=32, seed=0)
    upload = client.post(
        "/files", files={"file": (data.name, data.read_bytes())}, data={"purpose": "fine-tune"}
    )
    upload.raise_for_status()
    job = client.post(
        "/fine_tuning/jobs",
        json={
            "training_file": upload.json()["id"],
            "brand": BRAND,
            "trigger_word": "acme style",
            "seed": 0,
            "validation_prompts": BRAND_PROMPTS,
            # The recipe measured in tests/finetune/test_lora_brand.py (brand_score 0.09 → 0.84).
            "hyperparameters": {
                "steps": steps,
                "rank": 4,
                "alpha": 4,
                "learning_rate": 4e-3,
                "batch_size": 8,
            },
        },
    )
    job.raise_for_status()
    job = follow_job(client, job.json())
    if job["status"] != "succeeded":
        raise RuntimeError(f"fine-tune {job['id']} {job['status']}: {job['error']}")
    import mlflow

    mlflow_client = mlflow.MlflowClient(s.resolved_mlflow_uri)
    exp = mlflow_client.get_experiment_by_name(experiment_name(tenant))
    [run] = mlflow_client.search_runs([exp.experiment_id], f"tags.job_id = '{job['id']}'")
    tiles = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = mlflow_client.download_artifacts(run.info.run_id, "validation", tmp)
        for path, prompt in zip(sorted(Path(folder).glob("*.png")), BRAND_PROMPTS, strict=False):
            pair = Image.open(path).convert("RGB")
            half = pair.width // 2
            for box, label in (
                ((0, 0, half, pair.height), "base"),
                ((half, 0, pair.width, pair.height), f"{job['fine_tuned_model']}"),
            ):
                buf = io.BytesIO()
                pair.crop(box).save(buf, format="PNG")
                tiles.append((buf.getvalue(), f"{label}: {prompt}"))
    return tiles


def hotswap_tiles(client: httpx.Client) -> list[tuple[bytes, str]]:
    """Render the brand prompts through the API with the new adapter (`acme@staging`): the
    warm replica loads it on the fly, no restart; the response names the version used."""
    tiles = []
    for i, prompt in enumerate(BRAND_PROMPTS):
        resp = client.post(
            "/images/generations",
            json={
                "prompt": prompt,
                "seed": 2000 + i,
                "adapter": f"{BRAND}@staging",
                "response_format": "b64_json",
            },
        )
        if resp.status_code != 200:
            raise RuntimeError(f"render with {BRAND}@staging failed: {resp.text}")
        body = resp.json()
        used = body["adapter"]
        png = base64.b64decode(body["data"][0]["b64_json"])
        tiles.append((png, f"API, adapter {used['brand']} v{used['version']}: {prompt}"))
    return tiles


def run_demo(settings: Settings, tenant: str, console: Console, tune_steps: int = 500) -> None:
    s = LocalStack(settings, lambda m: console.print(f"[dim]•[/dim] {m}")).up()
    key = demo_key(s, tenant)
    tiles: list[tuple[bytes, str]] = []
    urls: list[str] = []
    with (
        httpx.Client(base_url=f"{s.api_url}/v1", timeout=300) as client,
        Progress(console=console) as bar,
    ):
        task = bar.add_task("rendering through the HTTP API", total=len(PROMPTS))
        for i, prompt in enumerate(PROMPTS):
            t0 = time.perf_counter()
            resp = client.post(
                "/images/generations",
                headers={"Authorization": f"Bearer {key}"},
                json={"prompt": prompt, "seed": 1000 + i, "response_format": "url"},
            )
            if resp.status_code != 200:
                raise RuntimeError(f"render failed ({resp.status_code}): {resp.text}")
            item = resp.json()["data"][0]
            png = httpx.get(item["url"], timeout=60).content
            tiles.append((png, f"{prompt} (seed {item['seed']}, {time.perf_counter() - t0:.1f}s)"))
            urls.append(item["url"].split("?", 1)[0])
            bar.advance(task)
    with httpx.Client(
        base_url=f"{s.api_url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=300
    ) as client:
        console.print(f"fine-tuning brand {BRAND!r} ({tune_steps} steps) as a Ray job")
        tiles += fine_tune_brand(s, client, tenant, tune_steps)
        console.print(f"rendering with adapter {BRAND}@staging through the API (hot-swap)")
        tiles += hotswap_tiles(client)
    out_dir = s.state_dir / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    sheet_path = out_dir / "contact-sheet.png"
    contact_sheet(tiles).save(sheet_path)
    console.print(f"[bold green]demo done[/bold green]: {len(tiles)} images for tenant {tenant!r}")
    console.print(f"  contact sheet     {sheet_path}")
    console.print(f"  stored renders    {urls[0].rsplit('/', 3)[0]}/...")
    console.print(f"  API               {s.api_url}/v1  (key for {tenant}: {key})")
    console.print(
        f"  MLflow dashboard  {s.resolved_mlflow_uri}  (experiment "
        f"{experiment_name(tenant)}, model {tenant}.{BRAND})"
    )
    console.print(f"  Ray dashboard     {s.ray_dashboard_url}")
    console.print("  stop the farm with `brandfarm down` (data stays in the state directory)")
