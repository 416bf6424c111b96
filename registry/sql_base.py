"""The declarative base every table module maps onto, and the clock its timestamps use.

Its own module, below every table module and `registry.db`, so that no import cycle can form.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
