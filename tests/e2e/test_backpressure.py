"""The replica's bounded queue and render deadline, through Ray Serve: past the queue the API
answers 503 `overloaded` with Retry-After, and a render past `render_timeout_s` answers 503
`render_timeout`; neither stores or charges anything."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tight(farm):
    """The shared farm redeployed with one request in a replica, one waiting, and a deadline
    far shorter than a long render; restored afterwards."""
    settings = farm.settings.model_copy(
        update={"max_ongoing_requests": 1, "max_queued_requests": 1, "render_timeout_s": 0.3}
    )
    farm.stack.redeploy(settings)
    try:
        yield farm
    finally:
        farm.stack.redeploy(farm.settings)


def _long_render(farm, key: str) -> dict:
    side = farm.model.native_size
    body = {"prompt": "a red circle", "size": f"{side}x{side}", "steps": farm.settings.max_steps}
    with farm.http(key) as http:
        r = http.post("/images/generations", json=body)
    return {"status": r.status_code, "body": r.json(), "retry": r.headers.get("Retry-After")}


def test_a_full_queue_answers_503_overloaded_and_a_late_render_503_render_timeout(tight):
    key = tight.new_tenant("backpressure-co")
    renders_before = tight.tenants.count_renders()
    objects_before = tight.all_objects()
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _long_render(tight, key), range(8)))
    codes = {a["body"]["error"]["code"] for a in answers if a["status"] == 503}
    assert all(a["status"] == 503 for a in answers), answers
    assert codes == {"overloaded", "render_timeout"}, answers
    assert all(a["retry"] for a in answers if a["body"]["error"]["code"] == "overloaded")
    assert tight.tenants.count_renders() == renders_before
    assert tight.all_objects() == objects_before
