"""The farm's log of alias changes: one row per "brand X's aliases moved", so that every ingress
replica drops its cached alias answers for that brand within one poll.

A row is written by the ingress that learned of the change first (the farm's own alias API, or
MLflow's registry webhook); every ingress polls `after(last seen id)` and invalidates what the
rows name. Ids only grow, so a poller never misses a row; old rows are pruned.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, DateTime, Integer, String, delete, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from registry.sql_base import Base, utcnow

#: How long rows are kept: far beyond any poll interval, so a poller that fell behind (a GC
#: pause, a slow database) still finds what it missed.
KEEP = dt.timedelta(hours=1)


class AliasEventRow(Base):
    """The aliases of one tenant's brand changed (which alias and version is not needed: the
    ingress asks MLflow again)."""

    __tablename__ = "alias_events"
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    tenant_id: Mapped[str] = mapped_column(String(64))
    brand: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))  # "api" or "mlflow"
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)


class AliasEventLog:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(self, tenant_id: str, brand: str, source: str) -> int:
        """Append an event; returns its id."""
        with Session(self.engine) as s, s.begin():
            row = AliasEventRow(
                tenant_id=tenant_id, brand=brand, source=source, created_at=utcnow()
            )
            s.add(row)
            s.flush()
            return row.id

    def latest(self) -> int:
        """The newest event's id (0: none yet)."""
        with Session(self.engine) as s:
            return s.scalar(select(func.max(AliasEventRow.id))) or 0

    def after(self, event_id: int, limit: int = 1000) -> list[tuple[int, str, str]]:
        """Events newer than `event_id`, oldest first: (id, tenant, brand)."""
        query = (
            select(AliasEventRow.id, AliasEventRow.tenant_id, AliasEventRow.brand)
            .where(AliasEventRow.id > event_id)
            .order_by(AliasEventRow.id)
            .limit(limit)
        )
        with Session(self.engine) as s:
            return [tuple(r) for r in s.execute(query)]

    def prune(self, now: dt.datetime | None = None) -> int:
        """Delete events older than `KEEP`; returns how many."""
        cutoff = (now or utcnow()) - KEEP
        with Session(self.engine) as s, s.begin():
            return s.execute(
                delete(AliasEventRow).where(AliasEventRow.created_at < cutoff)
            ).rowcount
