"""Schemathesis against the app's own OpenAPI schema, in-process with real services: SQLite, the
embedded object store and MLflow server, and the real engine on `tiny-sd-random`. Every response
must be documented and match its schema, and none may be a 5xx. Prints the totals (`-s`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from serve.api import create_api

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 100  # x 11 operations with inputs: over 1,000 cases
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@dataclass
class Tally:
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def fuzz_services(local_parts):
    """Over a real MLflow server (the embedded one, as `brandfarm up` starts it): adapter
    routes answer what they would in production, 404 for adapters the tenant lacks."""
    local_parts.stack.start("mlflow")
    try:
        # Small limits keep the renders that pass validation to a fraction of a second.
        yield local_parts.services(
            local_parts.settings.resolved_mlflow_uri, max_steps=2, max_images_per_request=2
        )
    finally:
        local_parts.stack.component("mlflow").stop()


@pytest.fixture(scope="module")
def fuzz_key(fuzz_services) -> str:
    return fuzz_services.tenants.create_tenant("fuzz-co").key


def fuzz_operation(operation, key: str, tally: Tally) -> None:
    """Run Hypothesis over one operation's generated cases."""

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,  # the same cases on every run: a CI failure reproduces
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=operation.as_strategy())
    def run(case) -> None:
        tally.cases += 1
        try:
            response = case.call_and_validate(
                headers={"Authorization": f"Bearer {key}"}, checks=CHECKS
            )
        except Exception as e:
            tally.failures.append(f"{case.method} {case.path}: {str(e)[:2000]}")
            raise
        tally.statuses[response.status_code] += 1

    run()


def test_every_response_is_documented_and_none_is_a_5xx(fuzz_services, fuzz_key):
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_api(fuzz_services))
    tally = Tally()
    errors = []
    for result in schema.get_all_operations():
        operation = result.ok()
        before = tally.cases
        try:
            fuzz_operation(operation, fuzz_key, tally)
        except Exception as e:  # noqa: BLE001 - collect every operation's failure, then fail
            errors.append(f"{operation.method.upper()} {operation.path}: {str(e)[:2000]}")
        print(f"{operation.method.upper()} {operation.path}: {tally.cases - before} cases")
    print(f"\nschemathesis: {tally.cases} cases, statuses {dict(sorted(tally.statuses.items()))}")
    assert errors == []
    assert tally.cases >= 1000
    assert not any(status >= 500 for status in tally.statuses)
