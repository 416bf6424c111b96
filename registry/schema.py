"""The farm database's whole model: importing this registers every table on `metadata`.

Alembic's environment compares against it (autogenerate) and the schema tests check that the
migrated database and the models agree. Add a table module here when you add one.
"""

from __future__ import annotations

import registry.alias_events  # noqa: F401 - registers its tables
import registry.content_policy  # noqa: F401
import registry.files  # noqa: F401
import registry.jobs  # noqa: F401
import registry.near_duplicates  # noqa: F401
import registry.render_limits  # noqa: F401
import registry.render_queue  # noqa: F401
import registry.tenants  # noqa: F401
import registry.webhooks  # noqa: F401
from registry.sql_base import Base

metadata = Base.metadata
