"""`POST /v1/provenance/verify`: the provenance report of an uploaded image (C2PA validity and
trust, the manifest's claims, the generation parameters and the watermark payload)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Form, Request, UploadFile

from serve.api import ApiServices, Tenant, documented
from serve.errors import InvalidField
from serve.provenance import NotAnImage, verify_image

VERIFY_PATH = "/v1/provenance/verify"
router = APIRouter()


@router.post(VERIFY_PATH, responses=documented())
async def verify(
    request: Request,
    _: Tenant,
    file: Annotated[UploadFile, Form(description="The image file (PNG, JPEG or WebP).")],
) -> dict:
    """200 with `manifest: null` for an image without a C2PA manifest; 400 for a file that is
    not an image."""
    services: ApiServices = request.app.state.services
    data = await file.read()
    try:
        return await asyncio.to_thread(verify_image, data, services.images.outputs.trust_anchors)
    except NotAnImage as e:
        raise InvalidField("file", f"file is {e}; send a PNG, JPEG or WebP image") from None
