"""The editing side of the CLI: `brandfarm edit`, `vary`, `upscale` and `interpolate`, over HTTP
as one tenant (the key in `BRANDFARM_API_KEY` or `--api-key`), writing the images as PNG files.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from cluster.tenant_cli import ApiKey, _client, _ok, console

Out = Annotated[Path, typer.Option(help="Folder the PNG files are written to.")]
Adapter = Annotated[str | None, typer.Option(help="Brand adapter: acme, acme@staging, acme:3.")]
N = Annotated[int, typer.Option(help="How many images.")]
Seed = Annotated[int | None, typer.Option(help="Seed of the first image.")]


def _call(what: str, send: Callable[[], httpx.Response]) -> dict:
    """Send one request with a live spinner and elapsed time, then answer its JSON."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        bar.add_task(what, total=None)
        try:
            resp = send()
        except httpx.HTTPError as e:
            console.print(f"[red]error:[/red] the API is unreachable ({e}); is the farm up?")
            raise typer.Exit(1) from e
    return _ok(resp)


def _write(body: dict, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, item in enumerate(body["data"]):
        path = out / f"{stem}-{body['id']}-{i}.png"
        path.write_bytes(base64.b64decode(item["b64_json"]))
        paths.append(path)
        console.print(f"wrote {path} (seed {item['seed']})")
    if body.get("source_render"):
        console.print(
            f"render {body['id']}: {body['operation']} of {body['source_render']} "
            f"image {body['source_index']}"
        )
    return paths


def _fields(**values: object) -> dict[str, str]:
    return {k: str(v) for k, v in values.items() if v is not None}


def edit(
    image: Annotated[Path, typer.Argument(help="PNG, JPEG or WebP to edit.", exists=True)],
    prompt: Annotated[str, typer.Option(help="What the edited image shows.")],
    mask: Annotated[
        Path | None,
        typer.Option(help="Where to repaint: alpha 0, or white in a gray mask.", exists=True),
    ] = None,
    strength: Annotated[float | None, typer.Option(help="0..1, for edits without a mask.")] = None,
    adapter: Adapter = None,
    n: N = 1,
    seed: Seed = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    size: Annotated[str | None, typer.Option(help="WxH of the result.")] = None,
    out: Out = Path("."),
    api_key: ApiKey = None,
) -> None:
    """Edit an image: repaint the mask's area to match the prompt (POST /v1/images/edits)."""
    files = {"image": (image.name, image.read_bytes())}
    if mask is not None:
        files["mask"] = (mask.name, mask.read_bytes())
    data = _fields(
        prompt=prompt, strength=strength, adapter=adapter, n=n, seed=seed, steps=steps, size=size
    )
    data["response_format"] = "b64_json"
    with _client(api_key) as client:
        body = _call("editing", lambda: client.post("/images/edits", files=files, data=data))
    _write(body, out, "edit")


def vary(
    source: Annotated[str, typer.Argument(help="An image file, or a render id.")],
    index: Annotated[int, typer.Argument(help="The render's image index.")] = 0,
    strong: Annotated[bool, typer.Option(help="A strong variation (default: subtle).")] = False,
    adapter: Adapter = None,
    n: N = 1,
    seed: Seed = None,
    out: Out = Path("."),
    api_key: ApiKey = None,
) -> None:
    """Vary an image file (POST /v1/images/variations) or a stored render's image."""
    path = Path(source)
    with _client(api_key) as client:
        if path.is_file():
            data = _fields(adapter=adapter, n=n, seed=seed, response_format="b64_json")
            if strong:
                data["strength"] = "0.7"
            files = {"image": (path.name, path.read_bytes())}
            body = _call(
                "varying", lambda: client.post("/images/variations", files=files, data=data)
            )
        else:
            body = _call(
                f"varying {source} image {index}",
                lambda: client.post(
                    f"/renders/{source}/images/{index}/vary",
                    json={
                        "variant": "strong" if strong else "subtle",
                        "n": n,
                        "response_format": "b64_json",
                        **({"seed": seed} if seed is not None else {}),
                        **({"adapter": adapter} if adapter else {}),
                    },
                ),
            )
    _write(body, out, "vary")


def upscale(
    render_id: Annotated[str, typer.Argument(help="The stored render.")],
    index: Annotated[int, typer.Argument(help="Its image index.")] = 0,
    seed: Seed = None,
    out: Out = Path("."),
    api_key: ApiKey = None,
) -> None:
    """Upscale a stored render's image 2x (enlarged latents and a refining pass)."""
    payload: dict = {"response_format": "b64_json"}
    if seed is not None:
        payload["seed"] = seed
    with _client(api_key) as client:
        body = _call(
            f"upscaling {render_id} image {index}",
            lambda: client.post(f"/renders/{render_id}/images/{index}/upscale", json=payload),
        )
    _write(body, out, "upscale")


def interpolate(
    from_prompt: Annotated[str, typer.Option(help="The first frame's prompt.")],
    from_seed: Annotated[int, typer.Option(help="The first frame's seed.")],
    to_prompt: Annotated[str, typer.Option(help="The last frame's prompt.")],
    to_seed: Annotated[int, typer.Option(help="The last frame's seed.")],
    frames: Annotated[int, typer.Option(help="Frames, both ends included (2..16).")] = 8,
    adapter: Adapter = None,
    out: Out = Path("."),
    api_key: ApiKey = None,
) -> None:
    """Frames along a latent interpolation between two prompts and seeds."""
    end = {"adapter": adapter} if adapter else {}
    payload = {
        "from": {"prompt": from_prompt, "seed": from_seed, **end},
        "to": {"prompt": to_prompt, "seed": to_seed, **end},
        "frames": frames,
        "response_format": "b64_json",
    }
    with _client(api_key) as client:
        body = _call(
            f"interpolating {frames} frames",
            lambda: client.post("/images/interpolations", json=payload),
        )
    _write(body, out, "frame")


def register(app: typer.Typer) -> None:
    """Add the editing commands to the top-level CLI."""
    for command in (edit, vary, upscale, interpolate):
        app.command()(command)
