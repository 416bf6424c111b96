"""Fine-tune job records and their event log, in SQL, scoped by tenant.

Status moves queued → running → succeeded | failed | cancelled and never leaves a terminal
state. Every status change is a compare-and-set (`UPDATE ... WHERE status IN (...)`, then the
row count), so of two racing changes exactly one wins, and only the winner writes its event.
Creation with the same (tenant, Idempotency-Key) returns the job created first. A new record is
an outbox entry (`submitted` false) until its Ray job is submitted; the reconciler
(`serve.reconciler`) submits any that a crash left behind.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from dataclasses import dataclass

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    select,
    true,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from registry.sql_base import Base, utcnow
from registry.webhooks import add_event as add_webhook_event

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
UNFINISHED = ("queued", "running")


class JobRow(Base):
    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    brand: Mapped[str] = mapped_column(String(63))
    training_file: Mapped[str] = mapped_column(String(40))
    base_model: Mapped[str] = mapped_column(String(255))
    spec: Mapped[str] = mapped_column(Text)  # JSON: trigger word, hyperparameters, seed, prompts
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    adapter_version: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_pid: Mapped[int | None] = mapped_column(Integer)
    # Outbox: False from the record's creation until its Ray job is submitted. Rows older than
    # the column were submitted when created (migration 0003_job_reconcile).
    submitted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=true())
    error_code: Mapped[str | None] = mapped_column(String(40))  # why `failed`, for tenants


class JobEventRow(Base):
    __tablename__ = "fine_tuning_job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")
    message: Mapped[str] = mapped_column(Text)
    step: Mapped[int | None] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant_id: str
    brand: str
    training_file: str
    base_model: str
    spec: dict
    status: str
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    adapter_version: int | None
    error: str | None
    attempts: int
    cancel_requested: bool
    worker_pid: int | None
    submitted: bool = True
    error_code: str | None = None

    @classmethod
    def of(cls, r: JobRow) -> JobRecord:
        return cls(
            r.id,
            r.tenant_id,
            r.brand,
            r.training_file,
            r.base_model,
            json.loads(r.spec),
            r.status,
            r.created_at,
            r.started_at,
            r.finished_at,
            r.adapter_version,
            r.error,
            r.attempts,
            r.cancel_requested,
            r.worker_pid,
            r.submitted,
            r.error_code,
        )


def timestamp(value: dt.datetime | None) -> int | None:
    """Unix seconds, as the API shows times."""
    return int(value.timestamp()) if value is not None else None


def job_object(job: JobRecord) -> dict:
    """A job as the API and its webhooks show it (OpenAI's fine_tuning.job shape)."""
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "status": job.status,
        "created_at": timestamp(job.created_at),
        "started_at": timestamp(job.started_at),
        "finished_at": timestamp(job.finished_at),
        "brand": job.brand,
        "model": job.base_model,
        "training_file": job.training_file,
        "trigger_word": job.spec.get("trigger_word"),
        "hyperparameters": job.spec.get("hyperparameters"),
        "seed": job.spec.get("seed"),
        "validation_prompts": job.spec.get("validation_prompts") or [],
        "webhook_url": job.spec.get("webhook_url"),
        "adapter_version": job.adapter_version,
        "fine_tuned_model": f"{job.brand}:{job.adapter_version}" if job.adapter_version else None,
        "attempts": job.attempts,
        "error": {"message": job.error, "code": job.error_code or "training_failed", "param": None}
        if job.error
        else None,
    }


@dataclass(frozen=True)
class JobEvent:
    id: int
    created_at: dt.datetime
    level: str
    message: str
    step: int | None
    loss: float | None


class JobStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(
        self,
        tenant_id: str,
        brand: str,
        training_file: str,
        base_model: str,
        spec: dict,
        idempotency_key: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """The new job and True, or the job already created with this key and False."""
        if idempotency_key:
            existing = self._by_key(tenant_id, idempotency_key)
            if existing:
                return existing, False
        job_id = f"ftjob-{secrets.token_hex(12)}"
        try:
            with Session(self.engine) as s, s.begin():
                s.add(
                    JobRow(
                        id=job_id,
                        tenant_id=tenant_id,
                        brand=brand,
                        training_file=training_file,
                        base_model=base_model,
                        spec=json.dumps(spec),
                        status="queued",
                        idempotency_key=idempotency_key,
                        submitted=False,
                    )
                )
                s.flush()  # the event row references the job row: insert the job first
                s.add(JobEventRow(job_id=job_id, message="job queued"))
        except IntegrityError:  # a concurrent create with the same key won the race
            existing = self._by_key(tenant_id, idempotency_key or "")
            if existing:
                return existing, False
            raise
        return self.get_any(job_id), True

    def _by_key(self, tenant_id: str, key: str) -> JobRecord | None:
        with Session(self.engine) as s:
            row = s.scalar(
                select(JobRow).where(JobRow.tenant_id == tenant_id, JobRow.idempotency_key == key)
            )
            return JobRecord.of(row) if row else None

    def get_any(self, job_id: str) -> JobRecord:
        """For the worker, which is handed a job id by the farm itself."""
        with Session(self.engine) as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise KeyError(job_id)
            return JobRecord.of(row)

    def get(self, tenant_id: str, job_id: str) -> JobRecord | None:
        with Session(self.engine) as s:
            row = s.get(JobRow, job_id)
            return JobRecord.of(row) if row is not None and row.tenant_id == tenant_id else None

    def list(self, tenant_id: str, after: str | None, limit: int) -> tuple[list[JobRecord], bool]:
        """Newest first; `after` is the id of the last job of the previous page."""
        with Session(self.engine) as s:
            q = select(JobRow).where(JobRow.tenant_id == tenant_id)
            if after:
                anchor = s.get(JobRow, after)
                if anchor is None or anchor.tenant_id != tenant_id:
                    raise KeyError(after)
                q = q.where(
                    (JobRow.created_at < anchor.created_at)
                    | ((JobRow.created_at == anchor.created_at) & (JobRow.id < anchor.id))
                )
            rows = s.scalars(
                q.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit + 1)
            )
            records = [JobRecord.of(r) for r in rows]
        return records[:limit], len(records) > limit

    def add_event(
        self,
        job_id: str,
        message: str,
        step: int | None = None,
        loss: float | None = None,
        level: str = "info",
    ) -> None:
        with Session(self.engine) as s, s.begin():
            s.add(JobEventRow(job_id=job_id, message=message, step=step, loss=loss, level=level))

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[JobEvent]:
        with Session(self.engine) as s:
            rows = s.scalars(
                select(JobEventRow)
                .where(JobEventRow.job_id == job_id, JobEventRow.id > after)
                .order_by(JobEventRow.id)
                .limit(limit)
            )
            return [JobEvent(r.id, r.created_at, r.level, r.message, r.step, r.loss) for r in rows]

    def mark_submitted(self, job_id: str) -> None:
        """The job's Ray job exists: take the record out of the outbox."""
        with Session(self.engine) as s, s.begin():
            s.execute(update(JobRow).where(JobRow.id == job_id).values(submitted=True))

    def unfinished(self) -> list[JobRecord]:
        """Every queued or running job, oldest first (the reconciler's worklist)."""
        with Session(self.engine) as s:
            rows = s.scalars(
                select(JobRow).where(JobRow.status.in_(UNFINISHED)).order_by(JobRow.created_at)
            )
            return [JobRecord.of(r) for r in rows]

    def mark_running(self, job_id: str, worker_pid: int) -> JobRecord | None:
        """Start (or restart) an attempt; None if the job is already terminal."""
        with Session(self.engine) as s, s.begin():
            won = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status.in_(UNFINISHED))
                .values(
                    status="running",
                    started_at=func.coalesce(JobRow.started_at, utcnow()),
                    attempts=JobRow.attempts + 1,
                    worker_pid=worker_pid,
                    submitted=True,  # a process of the job runs: it was submitted
                )
            )
            if won.rowcount != 1:
                return None
            return JobRecord.of(s.get(JobRow, job_id, populate_existing=True))

    def finish(
        self,
        job_id: str,
        status: str,
        adapter_version: int | None = None,
        error: str | None = None,
        error_code: str | None = None,
    ) -> bool:
        """Move to a terminal status, if and only if the job is not terminal yet (one atomic
        compare-and-set); False if another change got there first (nothing changes then).
        `error` is shown to the tenant: a short plain message, never raw exception text."""
        if status not in TERMINAL:
            raise ValueError(f"{status!r} is not a terminal status")
        if status == "failed" and error_code is None:
            error_code = "training_failed"
        with Session(self.engine) as s, s.begin():
            won = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status.in_(UNFINISHED))
                .values(
                    status=status,
                    finished_at=utcnow(),
                    adapter_version=adapter_version,
                    error=error,
                    error_code=error_code if status == "failed" else None,
                    worker_pid=None,
                )
            )
            if won.rowcount != 1:
                return False
            s.add(
                JobEventRow(
                    job_id=job_id,
                    message=f"job {status}" + (f": {error}" if error else ""),
                    level="error" if status == "failed" else "info",
                )
            )
            _add_webhook_events(s, JobRecord.of(s.get(JobRow, job_id, populate_existing=True)))
            return True

    def request_cancel(self, tenant_id: str, job_id: str) -> JobRecord | None:
        """Flag the job for cancellation if it is still unfinished (compare-and-set); the job as
        it now is, or None if the tenant has no such job."""
        with Session(self.engine) as s, s.begin():
            won = s.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    JobRow.tenant_id == tenant_id,
                    JobRow.status.in_(UNFINISHED),
                    JobRow.cancel_requested.is_(False),
                )
                .values(cancel_requested=True)
            )
            if won.rowcount == 1:
                s.add(JobEventRow(job_id=job_id, message="cancellation requested"))
            row = s.get(JobRow, job_id, populate_existing=True)
            if row is None or row.tenant_id != tenant_id:
                return None
            return JobRecord.of(row)

    def count(self) -> int:
        with Session(self.engine) as s:
            return int(s.scalar(select(func.count()).select_from(JobRow)) or 0)

    def cancel_requested(self, job_id: str) -> bool:
        with Session(self.engine) as s:
            return bool(s.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)))


def _add_webhook_events(session: Session, job: JobRecord) -> None:
    """The webhook events of a job's terminal transition, in the transaction that makes it: the
    compare-and-set lets one transition win, so each event is written exactly once."""
    url = job.spec.get("webhook_url")
    payload = job_object(job)
    if job.status == "succeeded" and job.adapter_version is not None:
        version = {
            "object": "adapter.version",
            "brand": job.brand,
            "version": job.adapter_version,
            "fine_tuned_model": payload["fine_tuned_model"],
            "base_model": job.base_model,
            "fine_tuning_job_id": job.id,
        }
        add_webhook_event(session, job.tenant_id, "adapter.version.created", version, url)
    add_webhook_event(session, job.tenant_id, f"fine_tuning.job.{job.status}", payload, url)
