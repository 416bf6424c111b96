"""`brandfarm verify FILE`: the provenance report of an image file, offline (C2PA validity and
trust against this farm's anchors, the manifest's claims, the generation parameters, the
watermark payload). Exit status: 0 valid and trusted, 1 otherwise, 2 not an image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from registry.settings import load_settings
from serve.provenance import NotAnImage, describe, verify_image
from serve.signing import SigningSetupError, trust_anchors_pem

console = Console()


def verify(
    file: Annotated[Path, typer.Argument(help="The image (PNG, JPEG or WebP) to verify.")],
) -> None:
    """Verify an image's C2PA manifest and read its watermark."""
    try:
        data = file.read_bytes()
    except OSError as e:
        console.print(f"[red]error:[/red] cannot read {file}: {e.strerror}")
        raise typer.Exit(2) from e
    try:
        anchors = trust_anchors_pem(load_settings())
    except SigningSetupError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    try:
        report = verify_image(data, anchors)
    except NotAnImage as e:
        console.print(f"[red]error:[/red] {file} is {e}")
        raise typer.Exit(2) from e
    console.print(describe(report), highlight=False)
    print(json.dumps(report, indent=2))
    raise typer.Exit(0 if report["valid"] and report["trusted"] else 1)
