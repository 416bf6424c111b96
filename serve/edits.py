"""Image editing: OpenAI's edits and variations, operations on a stored render (vary, remix,
upscale, zoom out, pan) and latent interpolation and blending.

Each request becomes one `RenderJob` with a source image, a mask or per-image mixes
(`serve.protocol.SourceImage`, `RowMix`), checked by the same `RenderLimits` as a generation
and rendered, stored, recorded and charged by the same `ImageService.render`: on the same
replicas, in the same batches, with the same brand adapters. Uploads are checked
(`serve.canvas`) before anything is admitted, so a bad one stores and charges nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from dataclasses import dataclass
from typing import Literal

from PIL import Image
from pydantic import BaseModel, Field, model_validator

from registry.base_models import BaseModelInfo
from registry.storage import ObjectStore, StorageError, render_key
from registry.tenants import RenderOrigin, TenantDirectory
from serve import canvas
from serve.canvas import UploadLimits
from serve.errors import APIError, InvalidField, StorageUnavailable
from serve.images import ImageService
from serve.protocol import (
    MAX_SEED,
    STRICT_BODY,
    ImageGenerationRequest,
    ImagesResponse,
    RenderJob,
    RowMix,
    SourceImage,
    Text,
)

#: img2img strengths: how much of the schedule reruns over the source (0 = the source).
EDIT_STRENGTH = 0.75  # an edit without a mask (diffusers' img2img default is 0.8)
VARIATION_STRENGTH = 0.6
VARY_STRENGTH = {"subtle": 0.35, "strong": 0.7}
REMIX_STRENGTH = 0.7
UPSCALE_STRENGTH = 0.35  # a refining pass over the enlarged latents
PAN_FRACTION = 0.25  # of the side

Operation = Literal["vary", "remix", "upscale", "zoom_out", "pan"]
ResponseFormat = Literal["url", "b64_json"]


@dataclass(frozen=True)
class EditForm:
    """The fields of `POST /v1/images/edits` and `/v1/images/variations` (multipart)."""

    image: bytes
    mask: bytes | None = None
    prompt: str | None = None
    n: int = 1
    size: str | None = None
    response_format: ResponseFormat = "url"
    model: str | None = None
    user: str | None = None
    adapter: str | None = None
    adapter_scale: float | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    strength: float | None = None


class RenderOperationRequest(BaseModel):
    """Body of `POST /v1/renders/{render_id}/images/{index}/{operation}`. Unset fields take the
    source render's values (prompt, steps, guidance, negative prompt, adapter and scale)."""

    model_config = STRICT_BODY

    variant: Literal["subtle", "strong"] | None = Field(
        None, description="vary only: subtle (low strength) or strong (high); default subtle."
    )
    prompt: Text | None = Field(
        None, description="remix: the new prompt (required); others: replaces the source's."
    )
    direction: Literal["left", "right", "up", "down"] | None = Field(
        None, description="pan only (required): the side where new content appears."
    )
    factor: float | None = Field(
        None, ge=1.25, le=4.0, description="zoom_out only: how far to zoom out (default 2)."
    )
    strength: float | None = Field(
        None, ge=0.0, le=1.0, description="img2img strength 0..1; default per operation."
    )
    n: int = Field(1, description="How many images (1..max_images_per_request).")
    seed: int | None = Field(None, description="Seed of the first image; image i uses seed+i.")
    steps: int | None = Field(None, description="Denoising steps; default: the source's.")
    guidance_scale: float | None = Field(None, description="Default: the source's.")
    negative_prompt: Text | None = Field(None, description="Default: the source's.")
    adapter: Text | None = Field(None, description="Brand adapter; default: the source's.")
    adapter_scale: float | None = Field(None, description="Default: the source's (or 1).")
    response_format: ResponseFormat = Field("url", description="`url` or `b64_json`.")

    def check_for(self, operation: str) -> None:
        """Fields that belong to another operation are refused, not ignored."""
        owners = {"variant": "vary", "direction": "pan", "factor": "zoom_out"}
        for name, owner in owners.items():
            if getattr(self, name) is not None and owner != operation:
                raise InvalidField(name, f"{name} applies to {owner} only, not to {operation}")
        if operation == "remix" and not (self.prompt or "").strip():
            raise InvalidField("prompt", "remix needs a new prompt")
        if operation == "pan" and self.direction is None:
            raise InvalidField("direction", "pan needs a direction: left, right, up or down")


class InterpolationEnd(BaseModel):
    model_config = STRICT_BODY

    prompt: Text = Field(description="What this end draws.")
    seed: int = Field(ge=0, le=MAX_SEED, description="Its initial noise.")
    adapter: Text | None = Field(None, description="A brand adapter at this end (optional).")


class InterpolationRequest(BaseModel):
    """Body of `POST /v1/images/interpolations`: frames along a slerp of the initial noise and
    a lerp of the text embeddings from `from` to `to` (first frame = `from`, last = `to`)."""

    model_config = STRICT_BODY

    start: InterpolationEnd = Field(alias="from", description="The first frame.")
    to: InterpolationEnd = Field(description="The last frame.")
    frames: int = Field(ge=2, le=16, description="Frames, both ends included (2..16).")
    size: Text | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: Text | None = None
    adapter_scale: float | None = Field(
        None, description="Scale of the ends' adapter (an adapter at one end only fades in)."
    )
    response_format: ResponseFormat = "url"

    @model_validator(mode="after")
    def _one_adapter(self) -> InterpolationRequest:
        ends = {self.start.adapter, self.to.adapter} - {None}
        if len(ends) > 1:
            raise ValueError(
                "from.adapter and to.adapter differ; name one adapter (at one end or both)"
            )
        return self


class WeightedPrompt(BaseModel):
    model_config = STRICT_BODY

    prompt: Text
    weight: float = Field(1.0, gt=0, le=100, description="Relative weight (normalised).")


class BlendRequest(BaseModel):
    """Body of `POST /v1/images/blends`: one image from a weighted mix of 2-3 prompts' text
    embeddings."""

    model_config = STRICT_BODY

    prompts: list[WeightedPrompt] = Field(min_length=2, max_length=3)
    n: int = 1
    seed: int | None = None
    size: Text | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: Text | None = None
    adapter: Text | None = None
    adapter_scale: float | None = None
    response_format: ResponseFormat = "url"


def png_text(png: bytes) -> dict[str, str]:
    """A PNG's text chunks: a farm render carries each of its parameters as one."""
    with Image.open(io.BytesIO(png)) as image:
        return dict(getattr(image, "text", {}) or {})


def _default_size(model: BaseModelInfo, size: tuple[int, int]) -> str | None:
    """The upload's own size when the model can render it, else the model's native size."""
    ok = all(
        model.size_multiple <= side <= model.max_side and side % model.size_multiple == 0
        for side in size
    )
    return f"{size[0]}x{size[1]}" if ok else None


class EditService:
    """Edits, variations, operations, interpolations and blends over `ImageService.render`."""

    def __init__(
        self,
        images: ImageService,
        store: ObjectStore,
        tenants: TenantDirectory,
        uploads: UploadLimits,
    ) -> None:
        self.images = images
        self.store = store
        self.tenants = tenants
        self.uploads = uploads

    @property
    def body_limit(self) -> int:
        """Body limit of the upload routes: image + mask + the form's other fields."""
        return 2 * self.uploads.max_bytes + 256 * 1024

    def _job(self, req: ImageGenerationRequest, prompt: str | None = None) -> RenderJob:
        """`RenderLimits.check`, allowing an empty prompt where the caller has none (a
        variation of an image without metadata runs unconditioned)."""
        if prompt is not None and not prompt.strip():
            checked = req.model_copy(update={"prompt": "-"})
            return dataclasses.replace(self.images.limits.check(checked), prompt=prompt)
        return self.images.limits.check(req)

    # --- OpenAI's edits and variations ---------------------------------------------------------

    async def _decode(self, form: EditForm) -> tuple[Image.Image, Image.Image | None]:
        def decode() -> tuple[Image.Image, Image.Image | None]:
            image = canvas.decode_upload("image", form.image, self.uploads)
            if form.mask is None:
                return image, canvas.alpha_mask(image)
            mask = canvas.decode_upload("mask", form.mask, self.uploads)
            return image, canvas.repaint_mask("mask", mask, image.size)

        return await asyncio.to_thread(decode)

    def _request(self, form: EditForm, prompt: str, size: str | None) -> ImageGenerationRequest:
        return ImageGenerationRequest.model_construct(
            prompt=prompt,
            n=form.n,
            size=form.size or size,
            response_format=form.response_format,
            model=form.model,
            negative_prompt=form.negative_prompt,
            seed=form.seed,
            steps=form.steps,
            guidance_scale=form.guidance_scale,
            user=form.user,
            adapter=form.adapter,
            adapter_scale=form.adapter_scale,
        )

    async def edit(self, tenant_id: str, form: EditForm) -> ImagesResponse:
        """OpenAI's `images.edit`: repaint the mask's area (or the whole image, by `strength`,
        without one) to match the prompt."""
        if form.prompt is None:
            raise InvalidField("prompt", "prompt is required for an edit")
        image, mask = await self._decode(form)
        req = self._request(form, form.prompt, _default_size(self.images.limits.model, image.size))
        job = self._job(req)
        size = (job.width, job.height)
        strength = form.strength if form.strength is not None else 1.0 if mask else EDIT_STRENGTH
        source = SourceImage(
            canvas.png_bytes(canvas.fit(image, size)),
            canvas.png_bytes(canvas.fit_mask(mask, size)) if mask is not None else None,
            strength,
        )
        return await self.images.render(tenant_id, req, dataclasses.replace(job, source=source))

    async def variation(self, tenant_id: str, form: EditForm) -> ImagesResponse:
        """OpenAI's `images.create_variation`: img2img over the image with its own prompt when
        its PNG carries one (a farm render does), unconditioned otherwise."""
        image, _ = await self._decode(form)
        prompt = png_text(form.image).get("prompt", "") if image.format == "PNG" else ""
        req = self._request(form, prompt, _default_size(self.images.limits.model, image.size))
        job = self._job(req, prompt)
        strength = VARIATION_STRENGTH if form.strength is None else form.strength
        source = SourceImage(
            canvas.png_bytes(canvas.fit(image, (job.width, job.height))), None, strength
        )
        return await self.images.render(tenant_id, req, dataclasses.replace(job, source=source))

    # --- operations on a stored render ----------------------------------------------------------

    async def _source(self, tenant_id: str, render_id: str, index: int) -> bytes:
        pools = self.images.pools
        render = await pools.db.run(self.tenants.get_render, tenant_id, render_id)
        if render is None or render.expired:
            # Another tenant's render reads exactly as a missing one.
            raise APIError(
                404,
                f"no render {render_id!r} for this tenant (or its images expired)",
                param="render_id",
                code="render_not_found",
            )
        if not 0 <= index < render.images:
            raise InvalidField(
                "index", f"render {render_id} has images 0..{render.images - 1}, got {index}"
            )
        try:
            return await pools.storage.run(
                self.store.get_bytes, render_key(tenant_id, render_id, index)
            )
        except StorageError as e:
            raise StorageUnavailable() from e

    async def operate(
        self,
        tenant_id: str,
        render_id: str,
        index: int,
        operation: Operation,
        body: RenderOperationRequest,
    ) -> ImagesResponse:
        """A new render from image `index` of a stored render, recording where it came from."""
        body.check_for(operation)
        png = await self._source(tenant_id, render_id, index)
        meta = png_text(png)
        source = Image.open(io.BytesIO(png)).convert("RGB")
        width, height = source.size
        mask = None
        strength = 1.0
        if operation == "vary":
            strength = VARY_STRENGTH[body.variant or "subtle"]
        elif operation == "remix":
            strength = REMIX_STRENGTH
        elif operation == "upscale":
            width, height = 2 * width, 2 * height  # the engine enlarges the source's latents
            strength = UPSCALE_STRENGTH
        elif operation == "zoom_out":
            source, mask = canvas.zoom_out(source, body.factor or 2.0)
        elif operation == "pan":
            source, mask = canvas.pan(source, body.direction, PAN_FRACTION)
        if body.strength is not None:
            strength = body.strength
        adapter = body.adapter or meta.get("adapter") or None
        scale = body.adapter_scale
        if scale is None and body.adapter is None and meta.get("adapter_scale"):
            scale = float(meta["adapter_scale"])
        prompt = body.prompt if body.prompt is not None else meta.get("prompt", "")
        req = ImageGenerationRequest.model_construct(
            prompt=prompt,
            n=body.n,
            size=f"{width}x{height}",
            response_format=body.response_format,
            model=None,
            negative_prompt=body.negative_prompt or meta.get("negative_prompt"),
            seed=body.seed,
            steps=body.steps if body.steps is not None else _int(meta.get("steps")),
            guidance_scale=(
                body.guidance_scale
                if body.guidance_scale is not None
                else _float(meta.get("guidance_scale"))
            ),
            user=None,
            adapter=adapter,
            adapter_scale=scale,
        )
        job = self._job(req, prompt)
        origin = RenderOrigin(render_id, index, operation)
        job = dataclasses.replace(
            job,
            source=SourceImage(
                canvas.png_bytes(source),
                canvas.png_bytes(mask) if mask is not None else None,
                strength,
            ),
            origin=tuple(origin.describe().items()),
        )
        return await self.images.render(tenant_id, req, job, origin)

    # --- interpolation and blending -------------------------------------------------------------

    async def interpolate(self, tenant_id: str, body: InterpolationRequest) -> ImagesResponse:
        """Frames from `from` to `to`: slerped initial noise, lerped text embeddings, and an
        adapter named at one end only fading in (or out) by its scale."""
        start, to = body.start, body.to
        adapter = start.adapter or to.adapter
        req = ImageGenerationRequest.model_construct(
            prompt=start.prompt,
            n=1,
            size=body.size,
            response_format=body.response_format,
            model=None,
            negative_prompt=body.negative_prompt,
            seed=start.seed,
            steps=body.steps,
            guidance_scale=body.guidance_scale,
            user=None,
            adapter=adapter,
            adapter_scale=body.adapter_scale,
        )
        if not to.prompt.strip():
            raise InvalidField("to.prompt", "prompt must not be empty")
        job = self._job(req)
        limit = self.images.limits.max_prompt_chars
        if len(to.prompt) > limit:
            raise InvalidField(
                "to.prompt", f"to.prompt is {len(to.prompt)} characters; the limit is {limit}"
            )
        full = 1.0 if body.adapter_scale is None else body.adapter_scale
        mixes = []
        for i in range(body.frames):
            t = i / (body.frames - 1)
            scale = None
            if adapter is not None and start.adapter != to.adapter:
                scale = full * (t if to.adapter else 1 - t)
            mixes.append(RowMix(((start.prompt, 1 - t), (to.prompt, t)), to.seed, t, scale))
        job = dataclasses.replace(job, seeds=(start.seed,) * body.frames, mixes=tuple(mixes))
        return await self.images.render(tenant_id, req, job)

    async def blend(self, tenant_id: str, body: BlendRequest) -> ImagesResponse:
        """Images of a weighted mix of 2-3 prompts' text embeddings (weights normalised)."""
        limit = self.images.limits.max_prompt_chars
        for i, part in enumerate(body.prompts):
            if not part.prompt.strip() or len(part.prompt) > limit:
                raise InvalidField(
                    f"prompts.{i}.prompt", f"prompt must hold 1 to {limit} characters"
                )
        total = sum(p.weight for p in body.prompts)
        prompts = tuple((p.prompt, p.weight / total) for p in body.prompts)
        described = " | ".join(f"{w:.3g}: {p}" for p, w in prompts)
        req = ImageGenerationRequest.model_construct(
            prompt=body.prompts[0].prompt,
            n=body.n,
            size=body.size,
            response_format=body.response_format,
            model=None,
            negative_prompt=body.negative_prompt,
            seed=body.seed,
            steps=body.steps,
            guidance_scale=body.guidance_scale,
            user=None,
            adapter=body.adapter,
            adapter_scale=body.adapter_scale,
        )
        job = self._job(req)
        mix = RowMix(prompts)
        job = dataclasses.replace(job, prompt=described, mixes=(mix,) * len(job.seeds))
        return await self.images.render(tenant_id, req, job)


def _int(text: str | None) -> int | None:
    return int(text) if text else None


def _float(text: str | None) -> float | None:
    return float(text) if text else None
