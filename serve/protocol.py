"""Request and response shapes of the render API, and the job the engine receives.

OpenAI Images API compatible (`/v1/images/generations`) with brandfarm extensions. Limits that
depend on the farm's settings and its base model are checked by `RenderLimits.check`, which
names the field and the limit in every error. No torch here: the ingress imports this.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from registry.adapter_refs import AdapterRef
from registry.base_models import BaseModelInfo
from registry.settings import Settings
from registry.tenants import RenderOrigin
from serve.errors import InvalidField

MAX_SEED = 2**32 - 1
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def _valid_unicode(text: str) -> str:
    # JSON may carry a lone surrogate ("\ud800"): a str Python accepts but no UTF-8 encoder,
    # tokenizer or database does. Refused here, it is a 400 naming the field, not a 500 later.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"must be valid Unicode text, but holds a lone surrogate at character {e.start}"
        ) from None
    return text


#: A request string: any valid Unicode text (lone surrogates refused).
Text = Annotated[str, AfterValidator(_valid_unicode)]

#: Request bodies: unknown fields refused, and no coercion between JSON types (`"n": true` or
#: `"n": "2"` is not a number; an integer is still a valid float).
STRICT_BODY = ConfigDict(extra="forbid", strict=True)


class AdapterEntry(BaseModel):
    """One adapter of a render that combines several (`adapters`)."""

    model_config = STRICT_BODY

    adapter: Text = Field(
        description="The tenant's brand adapter: `acme`, `acme@staging` or `acme:3`."
    )
    scale: float = Field(1.0, description="Its strength, 0..max_adapter_scale (default 1).")


class ImageGenerationRequest(BaseModel):
    """Body of `POST /v1/images/generations`. Unknown fields are refused, not ignored."""

    model_config = STRICT_BODY

    prompt: Text = Field(description="What to draw.")
    n: int = Field(1, description="How many images (1..max_images_per_request).")
    size: Text | None = Field(None, description="`WxH`; default is the model's native size.")
    response_format: Literal["url", "b64_json"] = Field(
        "url", description="`url` (presigned, stored object) or `b64_json` (inline PNG)."
    )
    model: Text | None = Field(None, description="Base model id; default is the farm's.")
    negative_prompt: Text | None = Field(None, description="What not to draw.")
    seed: int | None = Field(None, description="Seed of the first image; image i uses seed+i.")
    steps: int | None = Field(None, description="Denoising steps; default from the model.")
    guidance_scale: float | None = Field(None, description="Classifier-free guidance scale.")
    user: Text | None = Field(None, max_length=256, description="OpenAI's end-user id; recorded.")
    adapter: Text | None = Field(
        None,
        description="The tenant's brand adapter: `acme` (alias production), `acme@staging` "
        "(an alias) or `acme:3` (a version). Unset renders the base model. While the brand "
        "runs a canary, production renders use the champion or the challenger by a stable "
        "hash of the render id; the response's `adapter` names the version used.",
    )
    adapter_scale: float | None = Field(
        None, description="Strength of the adapter, 0..max_adapter_scale (default 1; 0 = base)."
    )
    adapters: list[AdapterEntry] | None = Field(
        None,
        description="Several of the tenant's adapters combined in one render, each with its "
        "own scale, up to max_adapters_per_request; instead of `adapter`. The order does not "
        "change the pixels; the first one routes the request to a replica.",
    )
    moderation: Literal["auto", "low"] | None = Field(
        None,
        description="OpenAI's content-moderation level: `low` waives the farm's sensitive "
        "terms unless the tenant's policy says `auto` (the stricter of the two applies).",
    )
    output_format: Literal["png", "jpeg", "webp"] = Field(
        "png", description="File format of the images (OpenAI's field): png, jpeg or webp."
    )
    output_compression: int | None = Field(
        None,
        ge=0,
        le=100,
        description="Quality 0..100 of jpeg and webp images (OpenAI's field; default 100). "
        "Refused with png, which is lossless.",
    )


@dataclass(frozen=True)
class AdapterSpec:
    """The concrete adapter version a render uses, as resolved by the ingress from the registry.

    `model_id` (`<tenant>/<brand>:<version>`) is the Serve multiplexing key; `weights_uri` and
    `sha256` tell a replica where the weights are and what they must hash to.
    """

    tenant: str
    brand: str
    version: int
    scale: float
    sha256: str
    weights_uri: str
    ref: str  # what the request named, e.g. "acme" or "acme@staging"
    dataset_sha256: str = ""  # of the version's training data (near-duplicate checks)
    #: "champion" or "challenger" when `ref` named a production alias that runs a canary.
    canary: str | None = None

    @property
    def model_id(self) -> str:
        return adapter_model_id(self.tenant, self.brand, self.version)

    def describe(self) -> dict:
        """The `adapter` object of a render response: the version actually used, and during a
        canary whether it was the champion or the challenger."""
        out = {"ref": self.ref, "brand": self.brand, "version": self.version, "scale": self.scale}
        if self.canary is not None:
            out["canary"] = self.canary
        return out


def adapter_model_id(tenant: str, brand: str, version: int) -> str:
    return f"{tenant}/{brand}:{version}"


@dataclass(frozen=True)
class SourceImage:
    """What an edit starts from. `png` is the source image at any size (the engine encodes it
    with the pipeline's VAE and resizes its latents to the job's size: upscaling); `mask`, at
    the job's size, is 255 where to repaint (grayscale PNG); `strength` (0..1) is how much of
    the schedule runs (0 returns the source, 1 starts from noise)."""

    png: bytes
    mask: bytes | None = None
    strength: float = 1.0


@dataclass(frozen=True)
class RowMix:
    """One image's start besides its seed: the text embeddings of weighted `prompts`, mixed
    linearly, and the initial noise slerped from its seed's toward `noise_seed`'s by `noise_t`.
    `adapter_scale` overrides the job's for this image (an interpolation toward an adapter)."""

    prompts: tuple[tuple[str, float], ...] = ()
    noise_seed: int | None = None
    noise_t: float = 0.0
    adapter_scale: float | None = None


@dataclass(frozen=True)
class RenderJob:
    """One validated render, as the engine receives it. Image i is rendered from seeds[i]."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    adapter: AdapterSpec | None = None  # the first (or only) adapter: it routes the job
    #: The other adapters of a render that combines several (`adapters`), in request order.
    extra_adapters: tuple[AdapterSpec, ...] = ()
    source: SourceImage | None = None  # an edit: start from this image (and mask)
    mixes: tuple[RowMix, ...] | None = None  # per image: mixed prompts, interpolated noise
    #: Recorded in each PNG's metadata: where the render came from (source_render, ...).
    origin: tuple[tuple[str, str | int | float | None], ...] = ()

    @property
    def adapters(self) -> tuple[AdapterSpec, ...]:
        """Every adapter of the render, the routing one first."""
        return ((self.adapter,) if self.adapter else ()) + self.extra_adapters

    def with_adapters(self, specs: tuple[AdapterSpec, ...]) -> RenderJob:
        """This job with the resolved adapters (the first routes it; none: the base model)."""
        return replace(self, adapter=specs[0] if specs else None, extra_adapters=tuple(specs[1:]))


@dataclass(frozen=True)
class RenderedImage:
    png: bytes
    seed: int


@dataclass(frozen=True)
class RenderLimits:
    """The bounds a request is checked against: the farm's settings and its base model's rules."""

    model: BaseModelInfo
    max_prompt_chars: int
    max_images: int
    max_steps: int
    max_guidance_scale: float
    max_adapter_scale: float = 2.0
    max_adapters: int = 1  # per request (`adapters`)

    @classmethod
    def from_settings(cls, settings: Settings, model: BaseModelInfo) -> RenderLimits:
        return cls(
            model=model,
            max_prompt_chars=settings.max_prompt_chars,
            max_images=settings.max_images_per_request,
            max_steps=settings.max_steps,
            max_guidance_scale=settings.max_guidance_scale,
            max_adapter_scale=settings.max_adapter_scale,
            max_adapters=settings.max_adapters_per_request,
        )

    def _size(self, size: str | None) -> tuple[int, int]:
        m = self.model
        if size is None:
            return m.native_size, m.native_size
        match = _SIZE.match(size)
        if not match:
            raise InvalidField("size", f"size must look like '512x512' (WxH), got {size!r}")
        w, h = int(match.group(1)), int(match.group(2))
        for side in (w, h):
            if side < m.size_multiple or side > m.max_side or side % m.size_multiple:
                raise InvalidField(
                    "size",
                    f"size {size!r}: width and height must be multiples of {m.size_multiple} "
                    f"between {m.size_multiple} and {m.max_side} for model {m.id!r}",
                )
        return w, h

    def adapters(self, req: ImageGenerationRequest) -> list[tuple[str, AdapterRef, float]]:
        """Every adapter the request names, as (field, parsed reference, scale), in request
        order: one from `adapter`, several from `adapters`, none for the base model. 400 for a
        bad reference or scale, both fields set, too many adapters, or one named twice."""
        entries = getattr(req, "adapters", None)  # edits build requests without the field
        if entries is None:
            single = self.adapter(req)
            return [] if single is None else [("adapter", *single)]
        if req.adapter is not None or req.adapter_scale is not None:
            field = "adapter" if req.adapter is not None else "adapter_scale"
            raise InvalidField(
                field,
                f"{field} and adapters are both set; name one adapter with `adapter` or several "
                "with `adapters`",
            )
        if not entries:
            raise InvalidField("adapters", "adapters is empty; leave it out for the base model")
        if len(entries) > self.max_adapters:
            raise InvalidField(
                "adapters",
                f"adapters names {len(entries)} adapters; the limit is {self.max_adapters} "
                "(max_adapters_per_request)",
            )
        parsed: list[tuple[str, AdapterRef, float]] = []
        seen: dict[str, int] = {}
        for i, entry in enumerate(entries):
            try:
                ref = AdapterRef.parse(entry.adapter)
            except ValueError as e:
                raise InvalidField(f"adapters.{i}.adapter", str(e)) from None
            if str(ref) in seen:
                raise InvalidField(
                    f"adapters.{i}.adapter",
                    f"adapter {str(ref)!r} is listed twice (adapters[{seen[str(ref)]}] and "
                    f"adapters[{i}]); list each adapter once with its scale",
                )
            seen[str(ref)] = i
            self._check_scale(f"adapters.{i}.scale", entry.scale)
            parsed.append((f"adapters.{i}.adapter", ref, entry.scale))
        return parsed

    def _check_scale(self, field: str, scale: float) -> None:
        if not 0 <= scale <= self.max_adapter_scale:  # NaN fails this too
            raise InvalidField(
                field, f"{field} must be between 0 and {self.max_adapter_scale}, got {scale}"
            )

    def adapter(self, req: ImageGenerationRequest) -> tuple[AdapterRef, float] | None:
        """The parsed adapter reference and scale, or None for the base model (400 if bad)."""
        if req.adapter is None:
            if req.adapter_scale is not None:
                raise InvalidField(
                    "adapter_scale", "adapter_scale is set but no adapter is named; add `adapter`"
                )
            return None
        try:
            ref = AdapterRef.parse(req.adapter)
        except ValueError as e:
            raise InvalidField("adapter", str(e)) from None
        scale = 1.0 if req.adapter_scale is None else req.adapter_scale
        self._check_scale("adapter_scale", scale)
        return ref, scale

    def check(
        self, req: ImageGenerationRequest, rng: secrets.SystemRandom | None = None
    ) -> RenderJob:
        """Validate every field against its limit and build the engine job (seeds drawn here).
        The adapter is checked here (`adapter`) but resolved by the caller, who sets it on the
        job with `dataclasses.replace`."""
        m = self.model
        if not req.prompt.strip():
            raise InvalidField("prompt", "prompt must not be empty")
        if len(req.prompt) > self.max_prompt_chars:
            raise InvalidField(
                "prompt",
                f"prompt is {len(req.prompt)} characters; the limit is {self.max_prompt_chars}",
            )
        if req.negative_prompt is not None and len(req.negative_prompt) > self.max_prompt_chars:
            raise InvalidField(
                "negative_prompt",
                f"negative_prompt is {len(req.negative_prompt)} characters; "
                f"the limit is {self.max_prompt_chars}",
            )
        if not 1 <= req.n <= self.max_images:
            raise InvalidField("n", f"n must be between 1 and {self.max_images}, got {req.n}")
        if req.model is not None and req.model != m.id:
            raise InvalidField(
                "model",
                f"model {req.model!r} is not served here; available: {m.id!r}",
                status=404,
                code="model_not_found",
            )
        steps = m.default_steps if req.steps is None else req.steps
        if not 1 <= steps <= self.max_steps:
            raise InvalidField(
                "steps", f"steps must be between 1 and {self.max_steps}, got {steps}"
            )
        guidance = m.default_guidance_scale if req.guidance_scale is None else req.guidance_scale
        if not 0 <= guidance <= self.max_guidance_scale:
            raise InvalidField(
                "guidance_scale",
                f"guidance_scale must be between 0 and {self.max_guidance_scale}, got {guidance}",
            )
        if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
            raise InvalidField("seed", f"seed must be between 0 and {MAX_SEED}, got {req.seed}")
        if req.output_compression is not None and req.output_format == "png":
            raise InvalidField(
                "output_compression",
                "output_compression applies to jpeg and webp only; png is lossless "
                "(set output_format, or leave output_compression out)",
            )
        width, height = self._size(req.size)
        self.adapters(req)
        if req.seed is None:
            rng = rng or secrets.SystemRandom()
            seeds = tuple(rng.randint(0, MAX_SEED) for _ in range(req.n))
        else:
            seeds = tuple((req.seed + i) % (MAX_SEED + 1) for i in range(req.n))
        return RenderJob(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance,
            seeds=seeds,
        )


@dataclass
class ImageData:
    seed: int
    url: str | None = None
    b64_json: str | None = None
    near_duplicate: dict | None = None  # the nearest protected or training image, if flagged

    def to_dict(self) -> dict:
        d: dict = {"seed": self.seed}
        if self.near_duplicate is not None:
            d["near_duplicate"] = self.near_duplicate
        if self.url is not None:
            d["url"] = self.url
        if self.b64_json is not None:
            d["b64_json"] = self.b64_json
        return d


@dataclass
class ImagesResponse:
    id: str
    created: int
    model: str
    data: list[ImageData] = field(default_factory=list)
    adapter: dict | None = None  # `AdapterSpec.describe()` of the version used, or None
    adapters: list[dict] = field(default_factory=list)  # every adapter used, in request order
    output_format: str = "png"
    origin: RenderOrigin | None = None  # the stored render an operation started from

    def to_dict(self) -> dict:
        d = {
            "id": self.id,
            "created": self.created,
            "model": self.model,
            "adapter": self.adapter,
            "adapters": self.adapters,
            "output_format": self.output_format,
            "data": [d.to_dict() for d in self.data],
        }
        if self.origin is not None:
            d.update(self.origin.describe())
        return d
