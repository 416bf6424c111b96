"""C2PA manifests on the farm's outputs, and their verification (`c2pa-python`).

`sign_manifest` embeds a signed manifest (a `c2pa.created` action, or `c2pa.edited` with the
source image as a parentOf ingredient; digitalSourceType trainedAlgorithmicMedia; the generator,
base model, adapter and render id) into PNG, JPEG or WebP bytes. `verify_image` reads one back:
validity (any changed pixel breaks the data hash), trust (against the farm's anchors), the
manifest's claims, the embedded generation parameters and the watermark payload.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import c2pa
import numpy as np
from PIL import Image, UnidentifiedImageError

from serve import watermark
from serve.image_formats import FORMATS, read_parameters
from serve.signing import SigningIdentity

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
RENDER_ASSERTION = "org.brandfarm.render"
SOURCE = "source"  # the label of an edit's source ingredient
_MIME_OF_PIL = {info.pil_name: info.content_type for info in FORMATS.values()}


def farm_version() -> str:
    try:
        return version("brandfarm")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "0.0.0+source"


@dataclass(frozen=True)
class ManifestClaims:
    """What one output's manifest says about how it was made."""

    render_id: str
    index: int
    base_model: str
    base_model_revision: str | None
    adapter: str | None  # brand:version; None for the base model or when the tenant hides it
    watermark: str | None  # the payload's hex, or None when the image is too small for one
    edited: bool = False


def _manifest(claims: ManifestClaims, title: str) -> dict:
    agent = {"name": "brandfarm", "version": farm_version()}
    actions = [
        {
            "action": "c2pa.edited" if claims.edited else "c2pa.created",
            "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
            "softwareAgent": agent,
        }
    ]
    if claims.edited:  # C2PA: an edit's first action opens its parentOf ingredient
        actions.insert(0, {"action": "c2pa.opened", "parameters": {"ingredientIds": [SOURCE]}})
    render = {
        "render_id": claims.render_id,
        "index": claims.index,
        "base_model": claims.base_model,
        "base_model_revision": claims.base_model_revision,
        "watermark": claims.watermark,
    }
    if claims.adapter is not None:
        render["adapter"] = claims.adapter
    return {
        "claim_generator_info": [agent],
        "title": title,
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": actions}},
            {"label": RENDER_ASSERTION, "data": render},
        ],
    }


def sign_manifest(
    data: bytes,
    content_type: str,
    claims: ManifestClaims,
    identity: SigningIdentity,
    title: str,
    source: bytes | None = None,
) -> bytes:
    """`data` (an image of `content_type`) with a signed C2PA manifest embedded. `source` (an
    edit's input image) becomes the manifest's parentOf ingredient."""
    signer = c2pa.Signer.from_callback(identity.sign, c2pa.C2paSigningAlg.ES256, identity.chain_pem)
    # No thumbnail: it would add tens of KB to every image for a copy of the image itself.
    context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}}, signer=signer)
    try:
        with c2pa.Builder(_manifest(claims, title), context=context) as builder:
            if source is not None:
                source_type = _content_type(source)
                builder.add_ingredient_from_stream(
                    {"title": SOURCE, "relationship": "parentOf", "label": SOURCE},
                    source_type,
                    io.BytesIO(source),
                )
            out = io.BytesIO()
            builder.sign(content_type, io.BytesIO(data), out)
            return out.getvalue()
    finally:
        context.close()


class NotAnImage(ValueError):
    """The bytes are not an image Pillow can read."""


def _open(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise NotAnImage(f"not a readable image ({e})") from None
    return image


def _content_type(data: bytes) -> str:
    image = _open(data)
    return _MIME_OF_PIL.get(image.format or "", Image.MIME.get(image.format or "", ""))


def _reader_context(trust_anchors_pem: str) -> c2pa.Context:
    if not trust_anchors_pem:
        return c2pa.Context()
    return c2pa.Context.from_dict(
        {"trust": {"trust_anchors": trust_anchors_pem}, "verify": {"verify_trust": True}}
    )


def _manifest_report(reader: c2pa.Reader) -> dict:
    state = reader.get_validation_state()
    results = reader.get_validation_results() or {}
    active = results.get("activeManifest") or {}
    manifest = reader.get_active_manifest() or {}
    claims = {
        "title": manifest.get("title"),
        "claim_generator_info": manifest.get("claim_generator_info"),
        "signature_info": manifest.get("signature_info"),
        "assertions": {a.get("label"): a.get("data") for a in manifest.get("assertions", [])},
        "ingredients": [
            {k: i.get(k) for k in ("title", "relationship", "format", "active_manifest")}
            for i in manifest.get("ingredients", [])
        ],
    }
    return {
        "validation_state": state,
        "valid": state in ("Valid", "Trusted"),
        "trusted": state == "Trusted",
        "failures": [
            {"code": f.get("code"), "explanation": f.get("explanation")}
            for f in active.get("failure", [])
        ],
        "claims": claims,
    }


def verify_image(data: bytes, trust_anchors_pem: str) -> dict:
    """The provenance report of an image file: `manifest` (None without one) with its validity,
    trust and claims; the embedded generation `parameters`; the `watermark` payload.
    Raises `NotAnImage` for bytes that are no image."""
    image = _open(data)
    content_type = _content_type(data)
    manifest = None
    error = None
    context = _reader_context(trust_anchors_pem)
    try:
        reader = c2pa.Reader.try_create(content_type, io.BytesIO(data), context=context)
        if reader is not None:
            with reader:
                manifest = _manifest_report(reader)
    except c2pa.C2paError as e:  # a manifest so damaged that it cannot be parsed
        error = str(e)
    finally:
        context.close()
    rgb = np.asarray(image.convert("RGB"))
    valid = bool(manifest and manifest["valid"])
    return {
        "format": (image.format or "").lower(),
        "content_type": content_type,
        "width": image.width,
        "height": image.height,
        "valid": valid,
        "trusted": bool(manifest and manifest["trusted"]),
        "manifest": manifest,
        "manifest_error": error,
        "parameters": read_parameters(image),
        "watermark": watermark.detect(rgb).to_dict(),
    }


def describe(report: dict) -> str:
    """A short human summary of `verify_image`'s report (the CLI prints it above the JSON)."""
    m = report["manifest"]
    if m is None:
        return "no C2PA manifest" + (
            f" ({report['manifest_error']})" if report["manifest_error"] else ""
        )
    render = m["claims"]["assertions"].get(RENDER_ASSERTION) or {}
    return (
        f"C2PA manifest {m['validation_state']} (valid={m['valid']}, trusted={m['trusted']}); "
        f"render {render.get('render_id')} image {render.get('index')}; "
        f"watermark {report['watermark']['payload'] or 'absent'}; "
        + json.dumps([f["code"] for f in m["failures"]])
    )
