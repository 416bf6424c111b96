"""Uploaded files (fine-tune datasets): validate fully, store, verify, then record.

OpenAI's Files API shape. Nothing is kept unless the whole dataset passed validation and the
stored object's bytes were read back with the right sha256; any failure removes what was written.
"""

from __future__ import annotations

import asyncio
import logging

from finetune.datasets import DatasetLimits, DatasetRejected, validate_dataset_zip
from registry.files import FileCatalog, FileRecord, new_file_id
from registry.sql_base import utcnow
from registry.storage import ObjectStore, StorageError, tenant_prefix
from serve.errors import APIError, InvalidField, StorageUnavailable
from serve.io_pools import BlockingPool
from serve.limits import LimitGuard
from serve.moderation import ModerationService

log = logging.getLogger(__name__)
PURPOSES = ("fine-tune",)


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
    ) -> None:
        self.moderation = moderation
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
            summary = await asyncio.to_thread(validate_dataset_zip, data, self.limits)
        except DatasetRejected as e:
            raise APIError(
                e.status, f"dataset rejected: {e}", param="file", code="invalid_dataset"
            ) from e
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
        if self.tenant_limits is not None:
            self.tenant_limits.stored(tenant_id, -record.bytes)
        return {"id": file_id, "object": "file", "deleted": True}
