"""Content policy: the matcher, malformed policies, and the API in-process over real parts
(engine, SQLite, object store): refusals leave only their audit event, and one tenant's policy
never touches another tenant."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from registry.content_policy import (
    ContentPolicy,
    PolicyError,
    find_violation,
    load_policy_file,
    parse_policy,
    stricter,
)
from registry.settings import Settings
from tests.serve.conftest import client

RENDER = "/v1/images/generations"
TINY = {"steps": 1, "size": "64x64"}


def violation(policy: dict, text: str, moderation: str = "auto"):
    return find_violation(parse_policy(policy), text, "tenant", moderation)


# --- the matcher ---------------------------------------------------------------------------


def test_terms_match_whole_words_in_any_case_and_spelling():
    policy = {"blocked_terms": ["blood", "red bull"]}
    assert violation(policy, "BLOOD on the floor").rule == "blocked_terms[0]"
    assert violation(policy, "a can of Red-Bull, cold").rule == "blocked_terms[1]"
    assert violation(policy, "bloodhound puppy") is None  # a word, not a substring
    assert violation(policy, "a red bullfinch") is None


def test_protected_marks_match_written_apart_or_as_one_word():
    policy = {"protected_marks": ["Coca-Cola"]}
    for text in ("a coca cola bottle", "COCA-COLA logo", "CocaCola ad", "coca  cola"):
        assert violation(policy, text).rule == "protected_marks[0]", text
    assert violation(policy, "cocoa and cola nuts") is None


def test_unicode_lookalikes_are_normalised():
    # Full-width letters (NFKC) and a different case are the same word.
    assert violation({"blocked_terms": ["acme"]}, "ＡＣＭＥ poster").matched == "acme"


def test_patterns_search_case_insensitively():
    found = violation({"blocked_patterns": [r"\bsk(u|ull)s?\b"]}, "three SKULLS")
    assert found.rule == "blocked_patterns[0]" and found.matched == "SKULLS"


def test_a_pattern_that_runs_too_long_refuses_the_text():
    # `regex` defuses the textbook (a+)+$; this one is still polynomial of high degree.
    found = violation({"blocked_patterns": [r"(.*a){25}b"]}, "a" * 200)
    assert found.rule == "blocked_patterns[0]" and "timed out" in found.matched


def test_sensitive_terms_apply_at_auto_only():
    policy = {"sensitive_terms": ["gore"]}
    assert violation(policy, "gore", "auto").rule == "sensitive_terms[0]"
    assert violation(policy, "gore", "low") is None


def test_the_stricter_moderation_level_wins():
    assert stricter("auto", "low") == "auto"
    assert stricter("low", None) == "low"
    assert stricter("low", "low") == "low"
    assert stricter("low", "auto") == "auto"


@pytest.mark.parametrize(
    ("document", "rule"),
    [
        ({"blocked_terms": ["ok", "x" * 201]}, "blocked_terms[1]"),
        ({"blocked_patterns": ["fine", "fine", "(unclosed"]}, "blocked_patterns[2]"),
        ({"protected_marks": ["ok", "--"]}, "protected_marks[1]"),
        ({"blocked_terms": "not a list"}, "blocked_terms"),
        ({"moderation": "none"}, "moderation"),
        ({"blocklist": ["x"]}, "blocklist"),
    ],
)
def test_a_malformed_policy_names_the_rule_and_its_position(document, rule):
    with pytest.raises(PolicyError) as e:
        parse_policy(document)
    assert e.value.rule == rule, str(e.value)


def test_a_malformed_farm_policy_file_stops_the_settings_naming_file_and_rule(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"blocked_patterns": ["(unclosed"]}))
    with pytest.raises(ValidationError, match=r"blocked_patterns\[0\].*policy\.json"):
        Settings(state_dir=tmp_path, content_policy_file=path)
    path.write_text("{not json")
    with pytest.raises(PolicyError, match="policy.json is not valid JSON"):
        load_policy_file(path)


# --- the API, in-process -------------------------------------------------------------------


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def farm_policy(tmp_path):
    path = tmp_path / "farm-policy.json"
    path.write_text(json.dumps({"blocked_terms": ["farmforbidden"], "sensitive_terms": ["gore"]}))
    return path


def test_refusals_leave_only_an_audit_event_and_never_touch_another_tenant(
    local_parts, farm_policy
):
    services = local_parts.services(content_policy_file=farm_policy)
    a = services.tenants.create_tenant("policy-a").key
    b = services.tenants.create_tenant("policy-b").key
    objects_before = sorted(o.key for o in services.store.list(""))

    async def go():
        async with client(services, a) as ca, client(services, b) as cb:
            put = await ca.put(
                "/v1/moderation/policy",
                json={"blocked_terms": ["zebra"], "protected_marks": ["Globex"]},
            )
            refused = [
                await ca.post(RENDER, json={**TINY, "prompt": "a zebra"}),
                await ca.post(RENDER, json={**TINY, "prompt": "x", "negative_prompt": "GLOBEX"}),
                await ca.post(RENDER, json={**TINY, "prompt": "farmforbidden"}),
                await ca.post(RENDER, json={**TINY, "prompt": "gore", "moderation": "low"}),
            ]
            b_zebra = await cb.post(RENDER, json={**TINY, "prompt": "a zebra", "seed": 1})
            b_farm = await cb.post(RENDER, json={**TINY, "prompt": "farmforbidden"})
            b_low = await cb.put("/v1/moderation/policy", json={"moderation": "low"})
            b_gore = await cb.post(RENDER, json={**TINY, "prompt": "gore", "moderation": "low"})
            a_events = await ca.get("/v1/moderation/events", params={"after": 0, "limit": 10})
            b_events = await cb.get("/v1/moderation/events")
            a_policy = await ca.get("/v1/moderation/policy")
            return put, refused, b_zebra, b_farm, b_low, b_gore, a_events, b_events, a_policy

    put, refused, b_zebra, b_farm, b_low, b_gore, a_events, b_events, a_policy = run(go())
    assert put.status_code == 200, put.text
    assert a_policy.json()["blocked_terms"] == ["zebra"]
    errors = [r.json()["error"] for r in refused]
    assert [r.status_code for r in refused] == [400] * 4
    assert {e["code"] for e in errors} == {"content_policy_violation"}
    assert [e["param"] for e in errors] == ["prompt", "negative_prompt", "prompt", "prompt"]
    assert "blocked_terms[0]" in errors[0]["message"] and "tenant" in errors[0]["message"]
    assert "protected_marks[0]" in errors[1]["message"]
    assert "farm content policy" in errors[2]["message"]
    assert "sensitive_terms[0]" in errors[3]["message"]  # A's policy says auto: low is ignored
    # Nothing rendered, stored or charged for A; every refusal audited, with its rule.
    assert services.tenants.count_renders("policy-a") == 0
    events = a_events.json()["data"]
    assert [(e["field"], e["scope"], e["rule"]) for e in events] == [
        ("prompt", "tenant", "blocked_terms[0]"),
        ("negative_prompt", "tenant", "protected_marks[0]"),
        ("prompt", "farm", "blocked_terms[0]"),
        ("prompt", "farm", "sensitive_terms[0]"),
    ]
    assert all(e["request_id"] for e in events)
    # B: A's rules do not apply; the farm's do; B's own `low` waives the sensitive terms.
    assert b_zebra.status_code == 200, b_zebra.text
    assert b_farm.status_code == 400 and b_farm.json()["error"]["param"] == "prompt"
    assert b_low.status_code == 200 and b_gore.status_code == 200, b_gore.text
    assert [e["rule"] for e in b_events.json()["data"]] == ["blocked_terms[0]"]
    assert services.tenants.count_renders("policy-b") == 2
    new_objects = sorted(o.key for o in services.store.list(""))
    assert not [k for k in new_objects if k not in objects_before and "policy-a" in k]


def test_a_caption_against_the_policy_refuses_the_upload_and_stores_nothing(local_parts, tmp_path):
    from finetune.world import write_brand_zip

    data = write_brand_zip(tmp_path / "acme.zip", "acme", n=4, seed=1).read_bytes()
    services = local_parts.services()
    key = services.tenants.create_tenant("policy-files").key

    async def go():
        async with client(services, key) as c:
            bad = await c.put("/v1/moderation/policy", json={"blocked_patterns": ["("]})
            await c.put("/v1/moderation/policy", json={"blocked_terms": ["teal"]})
            up = await c.post(
                "/v1/files",
                files={"file": ("acme.zip", data, "application/zip")},
                data={"purpose": "fine-tune"},
            )
            listed = await c.get("/v1/files")
            events = await c.get("/v1/moderation/events")
            return bad, up, listed, events

    bad, up, listed, events = run(go())
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"] == "blocked_patterns[0]"
    assert up.status_code == 400, up.text
    assert up.json()["error"]["code"] == "content_policy_violation"
    assert up.json()["error"]["param"] == "captions[0000.txt]"
    assert listed.json()["data"] == []
    assert not list(services.store.list("tenants/policy-files/"))
    [event] = events.json()["data"]
    assert (event["source"], event["field"]) == ("dataset", "captions[0000.txt]")


def test_the_default_policy_is_empty_and_auto():
    assert ContentPolicy().model_dump() == {
        "blocked_terms": [],
        "blocked_patterns": [],
        "protected_marks": [],
        "sensitive_terms": [],
        "moderation": "auto",
        "provenance_hide_adapter": False,
        "near_duplicate": "flag",
        "near_duplicate_distance": 6,
    }
