"""Uploaded files (fine-tune datasets, reference images): validate fully, store, verify, then
record, with the pHash of every image (`registry.near_duplicates`).

OpenAI's Files API shape. Nothing is kept unless the whole dataset passed validation and the
stored object's bytes were read back with the right sha256; any failure removes what was written.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from finetune.datasets import DatasetLimits, DatasetRejected, validate_dataset_zip
from registry.files import FileCatalog, FileRecord, new_file_id
from registry.near_duplicates import ImageHashIndex, zip_image_hashes
from registry.sql_base import utcnow
from registry.storage import ObjectStore, StorageError, tenant_prefix
from serve.errors import APIError, InvalidField, StorageUnavailable
from serve.io_pools import BlockingPool
from serve.limits import LimitGuard
from serve.moderation import ModerationService

log = logging.getLogger(__name__)
#: `fine-tune`: a training dataset (images + captions); `reference`: images the tenant protects
#: (every render is compared with them, `serve.near_duplicates`), captions optional.
PURPOSES = ("fine-tune", "reference")


def file_object(record: FileRecord) -> dict:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": int(record.created_at.timestamp()),
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "sha256": record.sha256,
        "images": record.images,
    }


def not_found(file_id: str) -> APIError:
    # The same answer whether the file never existed or belongs to another tenant.
    return APIError(404, f"no file {file_id!r}", param="file_id", code="file_not_found")


class FileService:
    def __init__(
        self,
        catalog: FileCatalog,
        store: ObjectStore,
        limits: DatasetLimits,
        tenant_limits: LimitGuard | None = None,
        storage_pool: BlockingPool | None = None,
        moderation: ModerationService | None = None,
        hashes: ImageHashIndex | None = None,
        on_hashed: Callable[[str], None] | None = None,
    ) -> None:
        self.moderation = moderation
        # Every uploaded image's pHash, for the near-duplicate check of renders; `on_hashed`
        # tells that check a tenant's hashes changed.
        self.hashes = hashes
        self.on_hashed = on_hashed
        self.catalog = catalog
        self.store = store
        self.limits = limits
        self.tenant_limits = tenant_limits
        # Object-store calls run on the ingress's storage pool, not the shared default one.
        self.storage = storage_pool or BlockingPool("storage", 4)

    def _store_verified(self, key: str, data: bytes, sha256: str) -> None:
        self.store.put_bytes(key, data, content_type="application/zip")
        try:
            self.store.verify(key, sha256)
        except StorageError:
            self.store.delete(key)
            raise

    async def upload(self, tenant_id: str, filename: str, purpose: str, data: bytes) -> dict:
        if purpose not in PURPOSES:
            raise InvalidField(
                "purpose", f"purpose must be one of {list(PURPOSES)}, got {purpose!r}"
            )
        try:
            limits = self.limits
            if purpose == "reference":  # any number of images from one; captions optional
                limits = dataclasses.replace(limits, min_images=1, require_captions=False)
            summary = await asyncio.to_thread(validate_dataset_zip, data, limits)
        except DatasetRejected as e:
            raise APIError(
                e.status, f"dataset rejected: {e}", param="file", code="invalid_dataset"
            ) from e
        hashes = await asyncio.to_thread(zip_image_hashes, data) if self.hashes else []
        if self.moderation is not None:  # every caption, before anything is stored
            await self.moderation.check(
                tenant_id, "dataset", {f"captions[{name}]": text for name, text in summary.captions}
            )
        if self.tenant_limits is not None:  # the storage cap (403), counting this upload
            await self.tenant_limits.check_stored_bytes(tenant_id, adding=len(data))
        file_id = new_file_id()
        key = f"{tenant_prefix(tenant_id)}files/{file_id}.zip"
        try:
            await self.storage.run(self._store_verified, key, data, summary.sha256)
        except StorageError as e:
            log.error("storing %s failed: %s", key, e)
            raise StorageUnavailable("retry the upload") from e
        record = FileRecord(
            id=file_id,
            tenant_id=tenant_id,
            filename=filename[:255],
            purpose=purpose,
            bytes=summary.bytes,
            sha256=summary.sha256,
            object_key=key,
            images=summary.images,
            created_at=utcnow(),
        )
        try:
            await asyncio.to_thread(self.catalog.add, record)
        except Exception:
            await self.storage.run(self.store.delete, key)
            raise
        if self.hashes is not None:
            try:
                await asyncio.to_thread(
                    self.hashes.add_file, tenant_id, file_id, summary.sha256, purpose, hashes
                )
            except Exception:
                await asyncio.to_thread(self.catalog.remove, tenant_id, file_id)
                await self.storage.run(self.store.delete, key)
                raise
            if self.on_hashed is not None:
                self.on_hashed(tenant_id)
        if self.tenant_limits is not None:
            self.tenant_limits.stored(tenant_id, len(data))
        return file_object(record)

    def list(self, tenant_id: str) -> dict:
        return {"object": "list", "data": [file_object(r) for r in self.catalog.list(tenant_id)]}

    def get(self, tenant_id: str, file_id: str) -> dict:
        record = self.catalog.get(tenant_id, file_id)
        if record is None:
            raise not_found(file_id)
        return file_object(record)

    def delete(self, tenant_id: str, file_id: str) -> dict:
        record = self.catalog.get(tenant_id, file_id)
        if record is None:
            raise not_found(file_id)
        try:
            self.store.delete(record.object_key)
        except StorageError as e:
            raise StorageUnavailable() from e
        self.catalog.remove(tenant_id, file_id)
        if self.hashes is not None:
            self.hashes.remove_file(tenant_id, file_id)
            if self.on_hashed is not None:
                self.on_hashed(tenant_id)
        if self.tenant_limits is not None:
            self.tenant_limits.stored(tenant_id, -record.bytes)
        return {"id": file_id, "object": "file", "deleted": True}
