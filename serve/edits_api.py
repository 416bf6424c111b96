"""Routes of the editing feature (`serve.edits`): thin, each reads its request and calls the
service. OpenAI's multipart edits and variations take the farm's own fields beside OpenAI's
(the `openai` client sends them from `extra_body`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Path, Request, UploadFile

from serve.api import Tenant, documented
from serve.edits import (
    BlendRequest,
    EditForm,
    EditService,
    InterpolationRequest,
    Operation,
    RenderOperationRequest,
    ResponseFormat,
)
from serve.errors import InvalidField
from serve.protocol import Text

#: Paths whose bodies carry images: they get the upload body limit, not the JSON one.
UPLOAD_PATHS = ("/v1/images/edits", "/v1/images/variations")

_Str = Annotated[Text | None, Form(max_length=1000)]


async def _file(request: Request, name: str, required: bool) -> bytes | None:
    """A file field; OpenAI's client names a list of images `image[]`, so that is accepted too."""
    form = await request.form()
    for key in (name, f"{name}[]"):
        value = form.get(key)
        if isinstance(value, str):
            raise InvalidField(name, f"{name} must be a file upload, not a text field")
        if value is not None:
            return await value.read()
    if required:
        raise InvalidField(name, f"{name} is required: upload a PNG, JPEG or WebP file")
    return None


def edits_router(service: EditService) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/images/edits", responses=documented(403, 404, 429, 503))
    async def edit_image(
        request: Request,
        tenant: Tenant,
        prompt: Annotated[Text, Form(description="What the edited image shows.")],
        image: Annotated[UploadFile | None, Form(description="The image to edit.")] = None,
        mask: Annotated[
            UploadFile | None,
            Form(description="Where to repaint: alpha 0 (OpenAI), or white in a gray mask."),
        ] = None,
        n: Annotated[int, Form()] = 1,
        size: _Str = None,
        response_format: Annotated[ResponseFormat, Form()] = "url",
        model: _Str = None,
        user: _Str = None,
        adapter: _Str = None,
        adapter_scale: Annotated[float | None, Form()] = None,
        seed: Annotated[int | None, Form()] = None,
        steps: Annotated[int | None, Form()] = None,
        guidance_scale: Annotated[float | None, Form()] = None,
        negative_prompt: _Str = None,
        strength: Annotated[float | None, Form(ge=0.0, le=1.0, description="0..1.")] = None,
    ) -> dict:
        form = EditForm(
            image=await _file(request, "image", True),
            mask=await _file(request, "mask", False),
            prompt=prompt,
            n=n,
            size=size,
            response_format=response_format,
            model=model,
            user=user,
            adapter=adapter,
            adapter_scale=adapter_scale,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            strength=strength,
        )
        return (await service.edit(tenant, form)).to_dict()

    @router.post("/v1/images/variations", responses=documented(403, 404, 429, 503))
    async def vary_image(
        request: Request,
        tenant: Tenant,
        image: Annotated[UploadFile | None, Form(description="The image to vary.")] = None,
        n: Annotated[int, Form()] = 1,
        size: _Str = None,
        response_format: Annotated[ResponseFormat, Form()] = "url",
        model: _Str = None,
        user: _Str = None,
        adapter: _Str = None,
        adapter_scale: Annotated[float | None, Form()] = None,
        seed: Annotated[int | None, Form()] = None,
        steps: Annotated[int | None, Form()] = None,
        strength: Annotated[float | None, Form(ge=0.0, le=1.0, description="0..1.")] = None,
    ) -> dict:
        form = EditForm(
            image=await _file(request, "image", True),
            n=n,
            size=size,
            response_format=response_format,
            model=model,
            user=user,
            adapter=adapter,
            adapter_scale=adapter_scale,
            seed=seed,
            steps=steps,
            strength=strength,
        )
        return (await service.variation(tenant, form)).to_dict()

    @router.post(
        "/v1/renders/{render_id}/images/{index}/{operation}",
        responses=documented(403, 404, 429, 503),
    )
    async def operate_on_render(
        render_id: Annotated[str, Path(max_length=64)],
        index: Annotated[int, Path(ge=0, le=1024)],
        operation: Operation,
        body: RenderOperationRequest,
        tenant: Tenant,
    ) -> dict:
        return (await service.operate(tenant, render_id, index, operation, body)).to_dict()

    @router.post("/v1/images/interpolations", responses=documented(403, 404, 429, 503))
    async def interpolate(body: InterpolationRequest, tenant: Tenant) -> dict:
        return (await service.interpolate(tenant, body)).to_dict()

    @router.post("/v1/images/blends", responses=documented(403, 404, 429, 503))
    async def blend(body: BlendRequest, tenant: Tenant) -> dict:
        return (await service.blend(tenant, body)).to_dict()

    return router
