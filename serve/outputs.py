"""The bytes the farm outputs for one rendered image: watermark → encode → sign.

`OutputEncoder.encode` is the one call every route that stores or returns an image makes
(renders here; edits and the async queue through `ImageService`): it embeds the invisible
watermark derived from the render id, encodes PNG, JPEG or WebP with the generation parameters
embedded, and signs a C2PA manifest into the result. Signing happens in the ingress, which holds
the signing identity; replicas only render.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from registry.settings import Settings
from serve import watermark
from serve.image_formats import FORMATS, encode_image, read_parameters
from serve.provenance import ManifestClaims, sign_manifest
from serve.signing import SigningIdentity, load_signing_identity, trust_anchors_pem


@dataclass(frozen=True)
class EncodedOutput:
    data: bytes
    content_type: str
    extension: str  # for the stored object's key: png, jpg or webp
    watermark: str | None  # the payload's hex, None when the image is too small to carry one


class OutputEncoder:
    """Turns rendered images into signed, watermarked output files (thread-safe)."""

    def __init__(
        self,
        identity: SigningIdentity,
        hide_adapter_tenants: frozenset[str] = frozenset(),
        trust_anchors: str = "",
    ) -> None:
        self.identity = identity
        #: PEM CA certificates verification trusts (`serve.signing.trust_anchors_pem`).
        self.trust_anchors = trust_anchors
        self.hide_adapter_tenants = hide_adapter_tenants

    @classmethod
    def from_settings(cls, settings: Settings) -> OutputEncoder:
        """With the settings' signing identity (the farm CA is created on first use when no
        identity is configured); raises `serve.signing.SigningSetupError` naming the file."""
        hidden = {t.strip() for t in settings.provenance_hide_adapter_tenants.split(",")}
        identity = load_signing_identity(settings, create_default=True)
        return cls(identity, frozenset(hidden - {""}), trust_anchors_pem(settings))

    def encode(
        self,
        image: bytes,
        *,
        tenant: str,
        render_id: str,
        index: int,
        output_format: str = "png",
        quality: int | None = None,
        source: bytes | None = None,
        hide_adapter: bool = False,
    ) -> EncodedOutput:
        """The output file of image `index` of render `render_id` for `tenant`.

        `image` is the engine's PNG (its `parameters` text holds the generation parameters,
        base model and adapter). `output_format` is png, jpeg or webp; `quality` (0..100) applies
        to jpeg and webp. `source`, for an edit, is the image it started from: the manifest then
        records `c2pa.edited` with it as the parentOf ingredient. `hide_adapter` (the tenant's
        content policy) or the operator's `provenance_hide_adapter_tenants` leave the adapter
        out of the manifest and the parameters.
        """
        rendered = Image.open(io.BytesIO(image))
        params = dict(read_parameters(rendered) or {})
        if hide_adapter or tenant in self.hide_adapter_tenants:
            params.pop("adapter", None)
            params.pop("adapter_scale", None)
            params.pop("adapters", None)
        payload = watermark.payload_for(render_id, index)
        rgb = np.asarray(rendered.convert("RGB"))
        marked = watermark.embed(rgb, payload)
        carried = payload.hex() if marked is not rgb else None
        params["watermark"] = carried
        fmt = FORMATS[output_format]
        encoded = encode_image(Image.fromarray(marked), output_format, params, quality)
        claims = ManifestClaims(
            render_id=render_id,
            index=index,
            base_model=str(params.get("base_model")),
            base_model_revision=params.get("base_model_revision"),
            adapter=params.get("adapter"),
            watermark=carried,
            edited=source is not None,
        )
        title = f"{render_id}/{index}.{fmt.extension}"
        signed = sign_manifest(encoded, fmt.content_type, claims, self.identity, title, source)
        return EncodedOutput(signed, fmt.content_type, fmt.extension, carried)
