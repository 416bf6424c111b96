"""Records of tenants' uploaded files (fine-tune datasets): what was stored where, and its hash.

Every read is scoped by tenant: another tenant's file id is indistinguishable from a missing one.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass

from sqlalchemy import DateTime, ForeignKey, Integer, String, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from registry.sql_base import Base, utcnow


class FileRow(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    object_key: Mapped[str] = mapped_column(String(512))
    images: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


@dataclass(frozen=True)
class FileRecord:
    id: str
    tenant_id: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    object_key: str
    images: int
    created_at: dt.datetime

    @classmethod
    def of(cls, row: FileRow) -> FileRecord:
        return cls(
            row.id,
            row.tenant_id,
            row.filename,
            row.purpose,
            row.bytes,
            row.sha256,
            row.object_key,
            row.images,
            row.created_at,
        )


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


class FileCatalog:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, record: FileRecord) -> FileRecord:
        with Session(self.engine) as s, s.begin():
            row = FileRow(
                id=record.id,
                tenant_id=record.tenant_id,
                filename=record.filename,
                purpose=record.purpose,
                bytes=record.bytes,
                sha256=record.sha256,
                object_key=record.object_key,
                images=record.images,
                created_at=record.created_at,
            )
            s.add(row)
        return record

    def get(self, tenant_id: str, file_id: str) -> FileRecord | None:
        with Session(self.engine) as s:
            row = s.get(FileRow, file_id)
            return FileRecord.of(row) if row is not None and row.tenant_id == tenant_id else None

    def list(self, tenant_id: str) -> list[FileRecord]:
        with Session(self.engine) as s:
            rows = s.scalars(
                select(FileRow)
                .where(FileRow.tenant_id == tenant_id)
                .order_by(FileRow.created_at.desc(), FileRow.id)
            )
            return [FileRecord.of(r) for r in rows]

    def remove(self, tenant_id: str, file_id: str) -> bool:
        with Session(self.engine) as s, s.begin():
            row = s.get(FileRow, file_id)
            if row is None or row.tenant_id != tenant_id:
                return False
            s.delete(row)
            return True

    def count(self) -> int:
        with Session(self.engine) as s:
            return int(s.scalar(select(func.count()).select_from(FileRow)) or 0)
