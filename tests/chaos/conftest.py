"""The chaos suite's own farm: one stack for the whole suite, never the e2e session's `farm`
(the suite kills parts of it). Package-scoped, so it is gone before the e2e tests start."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cluster.stack import LocalStack
from tests.conftest import Farm, farm_settings


@pytest.fixture(scope="package")
def chaos_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    stack = LocalStack(farm_settings(tmp_path_factory.mktemp("chaos") / "state"))
    try:
        yield Farm(stack, stack.up())
    finally:
        stack.down()
