"""Content policy: what a tenant (and the farm over every tenant) forbids in prompts, edit
prompts and fine-tune captions, the matcher, and the audit trail of refusals.

A policy holds blocked terms, blocked patterns (regular expressions), protected marks (other
brands' names, which nobody may prompt for) and a moderation level. The farm's policy
(`content_policy_file`) applies on top of every tenant's; its `sensitive_terms` apply only at
moderation `auto`, which a request or tenant may lower to `low` (OpenAI's `moderation` field).

Matching works on normalised text (Unicode NFKC, case-folded, every run of characters other
than letters and digits read as one space), so "Coca-Cola", "coca cola" and "COCA  COLA" are
one thing; a protected mark also matches written as one word ("CocaCola"). Patterns are
searched in the NFKC text, case-insensitively, with a time limit: a pattern that runs past it
refuses the text (closed, never open) and says so.
"""

from __future__ import annotations

import datetime as dt
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import regex
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import DateTime, ForeignKey, Integer, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from registry.sql_base import Base, utcnow

MAX_TERMS = 500
MAX_PATTERNS = 100
MAX_TERM_CHARS = 200
MAX_PATTERN_CHARS = 300
#: Longest a pattern may search one text before the text is refused.
PATTERN_TIMEOUT_S = 0.05

Moderation = Literal["auto", "low"]
Term = Field(min_length=1, max_length=MAX_TERM_CHARS)


class ContentPolicy(BaseModel):
    """A tenant's (or the farm's) content policy. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    blocked_terms: list[str] = Field(
        default_factory=list,
        max_length=MAX_TERMS,
        description="Words or phrases no prompt or caption may contain (whole words, any case).",
    )
    blocked_patterns: list[str] = Field(
        default_factory=list,
        max_length=MAX_PATTERNS,
        description="Regular expressions (case-insensitive) no prompt or caption may match.",
    )
    protected_marks: list[str] = Field(
        default_factory=list,
        max_length=MAX_TERMS,
        description="Other brands' names and marks, which nobody may prompt for.",
    )
    sensitive_terms: list[str] = Field(
        default_factory=list,
        max_length=MAX_TERMS,
        description="Terms refused only at moderation `auto` (a request may ask for `low`).",
    )
    moderation: Moderation = Field(
        "auto", description="`auto` (every rule) or `low` (sensitive_terms waived)."
    )
    provenance_hide_adapter: bool = Field(
        False,
        description="Leave the adapter (brand:version and scale) out of every output's C2PA "
        "manifest and embedded parameters.",
    )
    near_duplicate: Literal["off", "flag", "block"] = Field(
        "flag",
        description="An output whose perceptual hash is near a reference image or one of its "
        "adapter's training images: `flag` (response, PNG metadata, metric), `block` (422 "
        "near_duplicate) or `off`.",
    )
    near_duplicate_distance: int = Field(
        6,
        ge=0,
        le=32,
        description="Largest Hamming distance of the 64-bit pHashes that counts as near.",
    )

    @field_validator("blocked_terms", "protected_marks", "sensitive_terms")
    @classmethod
    def _terms(cls, terms: list[str]) -> list[str]:
        for i, term in enumerate(terms):
            if not 1 <= len(term) <= MAX_TERM_CHARS:
                raise ValueError(f"[{i}] must be 1 to {MAX_TERM_CHARS} characters")
            if not normalise(term):
                raise ValueError(f"[{i}] {term!r} has no letters or digits to match")
        return terms

    @field_validator("blocked_patterns")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        for i, pattern in enumerate(patterns):
            if not 1 <= len(pattern) <= MAX_PATTERN_CHARS:
                raise ValueError(f"[{i}] must be 1 to {MAX_PATTERN_CHARS} characters")
            try:
                regex.compile(pattern, regex.IGNORECASE)
            except regex.error as e:
                raise ValueError(f"[{i}] is not a valid regular expression: {e}") from None
        return patterns


class PolicyError(ValueError):
    """A malformed policy: `rule` names the field and position (`blocked_patterns[2]`)."""

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(f"{rule}: {message}")


def parse_policy(data: object) -> ContentPolicy:
    """Validate a policy document; the first problem raises `PolicyError` naming its rule."""
    try:
        return ContentPolicy.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(p) for p in first["loc"]]
        message = first["msg"].removeprefix("Value error, ")
        rule = loc[0] if loc else "policy"
        for part in loc[1:]:
            rule += f"[{part}]" if part.isdigit() else f".{part}"
        if message.startswith("[") and "]" in message:  # the validators name the position
            index, _, message = message[1:].partition("] ")
            rule += f"[{index}]"
        raise PolicyError(rule, message) from None


def load_policy_file(path: Path) -> ContentPolicy:
    """The farm's policy file (JSON); errors name the file and the rule."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise PolicyError("content_policy_file", f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise PolicyError("content_policy_file", f"{path} is not valid JSON: {e}") from None
    try:
        return parse_policy(data)
    except PolicyError as e:
        raise PolicyError(e.rule, f"{e} (in {path})") from None


def normalise(text: str) -> str:
    """NFKC, case-folded, every run of non-alphanumerics one space, trimmed."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(c if c.isalnum() else " " for c in folded).split())


@dataclass(frozen=True)
class Violation:
    """Why a text was refused: whose policy (`tenant` or `farm`), which rule, what matched."""

    scope: str
    rule: str
    matched: str

    def describe(self, field: str) -> str:
        return (
            f"{field} violates the {self.scope} content policy: rule {self.rule} "
            f"(matched {self.matched!r})"
        )


def _contains(text: str, term: str) -> bool:
    return f" {normalise(term)} " in f" {text} "


def _mark_in(text: str, mark: str) -> bool:
    """A mark matches as its words, or written as one word over up to four of the text's."""
    if _contains(text, mark):
        return True
    squashed = normalise(mark).replace(" ", "")
    words = text.split()
    return any(
        "".join(words[i : i + n]) == squashed
        for n in range(1, 5)
        for i in range(len(words) - n + 1)
    )


def find_violation(
    policy: ContentPolicy, text: str, scope: str, moderation: Moderation
) -> Violation | None:
    """The first rule of `policy` that `text` breaks, or None."""
    plain = normalise(text)
    for i, term in enumerate(policy.blocked_terms):
        if _contains(plain, term):
            return Violation(scope, f"blocked_terms[{i}]", term)
    for i, mark in enumerate(policy.protected_marks):
        if _mark_in(plain, mark):
            return Violation(scope, f"protected_marks[{i}]", mark)
    if moderation == "auto":
        for i, term in enumerate(policy.sensitive_terms):
            if _contains(plain, term):
                return Violation(scope, f"sensitive_terms[{i}]", term)
    nfkc = unicodedata.normalize("NFKC", text)
    for i, pattern in enumerate(policy.blocked_patterns):
        try:
            found = regex.search(pattern, nfkc, regex.IGNORECASE, timeout=PATTERN_TIMEOUT_S)
        except TimeoutError:
            return Violation(scope, f"blocked_patterns[{i}]", "(pattern timed out; text refused)")
        if found:
            return Violation(scope, f"blocked_patterns[{i}]", found.group(0)[:80])
    return None


def stricter(*levels: Moderation | None) -> Moderation:
    """`low` only when every level that is set says `low`."""
    return "low" if all(level in (None, "low") for level in levels) and any(levels) else "auto"


# --- storage ----------------------------------------------------------------------------------


class ContentPolicyRow(Base):
    """A tenant's policy document (validated JSON)."""

    __tablename__ = "content_policies"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    rules: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModerationEventRow(Base):
    """One refusal: the audit record, the only thing a refused request leaves behind."""

    __tablename__ = "moderation_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    source: Mapped[str] = mapped_column(String(40))  # the route: generation, edit, dataset
    field: Mapped[str] = mapped_column(String(255))  # prompt, negative_prompt, a caption's file
    scope: Mapped[str] = mapped_column(String(10))  # tenant or farm
    rule: Mapped[str] = mapped_column(String(80))
    matched: Mapped[str] = mapped_column(String(255))
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class PolicyStore:
    """Tenants' policies and the moderation audit trail in the farm database."""

    def __init__(self, engine) -> None:  # noqa: ANN001 - a SQLAlchemy engine
        self.engine = engine

    def get(self, tenant_id: str) -> ContentPolicy:
        with Session(self.engine) as s:
            row = s.get(ContentPolicyRow, tenant_id)
            return ContentPolicy() if row is None else parse_policy(json.loads(row.rules))

    def put(self, tenant_id: str, policy: ContentPolicy) -> ContentPolicy:
        with Session(self.engine) as s, s.begin():
            row = s.get(ContentPolicyRow, tenant_id)
            rules = policy.model_dump_json()
            if row is None:
                s.add(ContentPolicyRow(tenant_id=tenant_id, rules=rules))
            else:
                row.rules, row.updated_at = rules, utcnow()
        return policy

    def record(
        self,
        tenant_id: str,
        source: str,
        field: str,
        violation: Violation,
        request_id: str | None,
    ) -> int:
        with Session(self.engine) as s, s.begin():
            row = ModerationEventRow(
                tenant_id=tenant_id,
                source=source,
                field=field[:255],
                scope=violation.scope,
                rule=violation.rule,
                matched=violation.matched[:255],
                request_id=request_id,
            )
            s.add(row)
            s.flush()
            return row.id

    def events(self, tenant_id: str, after: int = 0, limit: int = 100) -> list[dict]:
        with Session(self.engine) as s:
            rows = s.scalars(
                select(ModerationEventRow)
                .where(ModerationEventRow.tenant_id == tenant_id, ModerationEventRow.id > after)
                .order_by(ModerationEventRow.id)
                .limit(limit)
            ).all()
            return [
                {
                    "id": r.id,
                    "object": "moderation.event",
                    "created_at": int(r.created_at.timestamp()),
                    "source": r.source,
                    "field": r.field,
                    "scope": r.scope,
                    "rule": r.rule,
                    "matched": r.matched,
                    "request_id": r.request_id,
                }
                for r in rows
            ]
