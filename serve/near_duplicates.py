"""The near-duplicate check of every rendered image, before anything is stored or charged.

Each output's pHash is compared with the tenant's reference images and with the training
images of the adapter version it used (`registry.near_duplicates`). The tenant's content policy
decides what a match within `near_duplicate_distance` does: `flag` names the match in the
response, in the PNG's metadata (`near_duplicate` text chunk) and in a metric; `block` refuses
the request with 422 `near_duplicate` and records a moderation event; `off` skips the check.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import replace

from cachetools import TTLCache
from PIL import Image, PngImagePlugin

from registry.content_policy import Violation
from registry.near_duplicates import HashSet, ImageHashIndex, Match, png_phash
from serve import request_context
from serve.errors import APIError
from serve.io_pools import BlockingPool
from serve.moderation import ModerationService
from serve.protocol import AdapterSpec, RenderedImage

#: Called once per flagged or blocked image: (tenant, action).
NearDuplicateObserver = Callable[[str, str], None]


def with_png_text(png: bytes, key: str, value: str) -> bytes:
    """The same PNG (same pixels) with `key` set, both as its own text chunk and inside the
    `parameters` JSON (which every output format carries on, `serve.image_formats`)."""
    with Image.open(io.BytesIO(png)) as image:
        text = dict(image.text)
        if "parameters" in text:
            params = json.loads(text["parameters"])
            params[key] = value
            text["parameters"] = json.dumps(params, sort_keys=True)
        text[key] = value
        info = PngImagePlugin.PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
        out = io.BytesIO()
        image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


class NearDuplicateService:
    def __init__(
        self,
        index: ImageHashIndex,
        moderation: ModerationService,
        pool: BlockingPool,
        on_match: NearDuplicateObserver | None = None,
        cache_ttl_s: float = 5.0,
    ) -> None:
        self.index = index
        self.moderation = moderation
        self.pool = pool
        self.on_match = on_match
        # A new reference upload shows within `cache_ttl_s` (at once on the ingress that took it).
        self._sets: TTLCache[tuple[str, str], HashSet] = TTLCache(maxsize=1024, ttl=cache_ttl_s)

    def forget(self, tenant_id: str) -> None:
        for key in [k for k in self._sets if k[0] == tenant_id]:
            self._sets.pop(key, None)

    def _candidates(self, tenant_id: str, dataset_sha256: str) -> HashSet:
        key = (tenant_id, dataset_sha256)
        found = self._sets.get(key)
        if found is None:
            found = self.index.candidates(tenant_id, dataset_sha256 or None)
            self._sets[key] = found
        return found

    def _scan(
        self, tenant_id: str, adapter: AdapterSpec | None, images: list[RenderedImage]
    ) -> list[Match | None]:
        candidates = self._candidates(tenant_id, adapter.dataset_sha256 if adapter else "")
        if not len(candidates.values):  # nothing to compare with: no hashing either
            return [None] * len(images)
        return [candidates.nearest(png_phash(image.png)) for image in images]

    async def check(
        self, tenant_id: str, adapter: AdapterSpec | None, images: list[RenderedImage]
    ) -> tuple[list[RenderedImage], list[dict | None]]:
        """The images to store (flagged ones carry the match in their metadata) and, per image,
        the match to report; raises 422 when the tenant's policy blocks a match."""
        policy = await self.moderation.policy(tenant_id)
        if policy.near_duplicate == "off":
            return images, [None] * len(images)
        nearest = await self.pool.run(self._scan, tenant_id, adapter, images)
        limit = policy.near_duplicate_distance
        matches = [m if m is not None and m.distance <= limit else None for m in nearest]
        if not any(matches):
            return images, [None] * len(images)
        action = policy.near_duplicate
        if self.on_match is not None:
            for _ in filter(None, matches):
                self.on_match(tenant_id, action)
        if action == "block":
            i, match = next((i, m) for i, m in enumerate(matches) if m is not None)
            described = f"{match.source} {match.file_id}:{match.image} at distance {match.distance}"
            await self.pool.run(
                self.moderation.store.record,
                tenant_id,
                "generation",
                f"data[{i}]",
                Violation("tenant", "near_duplicate", described),
                request_context.request_id.get(),
            )
            raise APIError(
                422,
                f"image {i} is a near-duplicate of {described} (near_duplicate_distance "
                f"{limit}); the tenant's content policy blocks it, so nothing was stored",
                param="near_duplicate",
                code="near_duplicate",
            )
        flagged = []
        for image, match in zip(images, matches, strict=True):
            if match is not None:
                note = json.dumps(match.to_dict(), sort_keys=True)
                image = replace(image, png=with_png_text(image.png, "near_duplicate", note))
            flagged.append(image)
        return flagged, [m.to_dict() if m else None for m in matches]
