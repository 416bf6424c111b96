"""A real object store for in-process tests: the embedded `rclone serve s3`, started alone
through the stack's own code (no Ray, no MLflow). Import the fixture into a test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cluster.stack import LocalStack
from registry.settings import Settings
from tests.conftest import farm_settings


@pytest.fixture(scope="module")
def s3_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of a running embedded S3 server (buckets made, credentials filled in)."""
    stack = LocalStack(farm_settings(tmp_path_factory.mktemp("s3") / "state"))
    stack.start("s3")
    try:
        yield stack.resolved_settings()
    finally:
        stack.component("s3").stop()
