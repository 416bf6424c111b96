"""The promotion gate: a brand's policy, a version's evaluation figures, and the one decision.

Every fine-tune evaluates its version before registering it (``finetune.evaluation``) and tags
the version with the figures (``eval.*``): the same held-out prompts and seeds rendered, and the
held-out images' denoising loss measured, with the base model, the brand's production version at
that time (if any) and the new version. `check_gate` compares the new version with that
*reference* (production, or the base model when there was none) under the brand's
`PromotionPolicy`:

- **improvement**: on the built-in model (where renders can be read back), the gain in
  ``brand_score`` (absolute, 0..1); on any other model, the relative drop of
  ``heldout_denoise_loss`` (``(reference - candidate) / reference``). It must be at least
  ``min_improvement`` (negative values accept a version that is at most that much worse).
- **prompt adherence** (built-in model only): the reference's rate minus the candidate's must be
  at most ``max_adherence_drop``.

A version registered without an evaluation (before evaluation existed, or by hand) has no
figures: the gate lets it through and says so. `promote` is the one path that moves
``production`` under the gate (the alias route, ``auto_promote`` at the end of a job, and a
canary's "promote challenger" all call it); a forced promotion past a failing gate is recorded
as version tags and as a note on the version's MLflow run.

The policy is stored as tags of the brand's registered model (``policy.*``): it lives with the
brand, is tenant-scoped by the same ``<tenant>.<brand>`` name (another tenant's brand is "not
found"), and the fine-tune job, which already talks to MLflow, reads it without a database.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass, field

from registry.adapter_refs import PRODUCTION
from registry.adapters import AdapterRegistry, AdapterVersion

POLICY_PREFIX = "policy."
EVAL_PREFIX = "eval."
#: Set on a version promoted with ``force`` past a failing gate (UTC, ISO 8601), with the reason.
FORCED_AT_TAG, FORCED_REASON_TAG = "promotion.forced_at", "promotion.forced_reason"
#: MLflow shows this run tag as the run's note (its "Description").
RUN_NOTE_TAG = "mlflow.note.content"
#: The variants an evaluation renders, in the grid's order.
VARIANTS = ("base", "production", "candidate")
#: The scores recorded per variant (``eval.<variant>.<score>``).
SCORES = ("heldout_denoise_loss", "brand_score", "prompt_adherence")


@dataclass(frozen=True)
class PromotionPolicy:
    """A brand's promotion gate; the farm's settings give the defaults."""

    min_improvement: float = 0.10
    max_adherence_drop: float = 0.10
    auto_promote: bool = False

    def to_tags(self) -> dict[str, str]:
        return {
            f"{POLICY_PREFIX}min_improvement": repr(float(self.min_improvement)),
            f"{POLICY_PREFIX}max_adherence_drop": repr(float(self.max_adherence_drop)),
            f"{POLICY_PREFIX}auto_promote": "true" if self.auto_promote else "false",
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str], default: PromotionPolicy) -> PromotionPolicy:
        """The policy in a registered model's tags; a missing or unreadable tag is the default."""

        def number(key: str, fallback: float) -> float:
            try:
                value = float(tags[POLICY_PREFIX + key])
            except (KeyError, ValueError):
                return fallback
            return value if math.isfinite(value) else fallback

        auto = tags.get(f"{POLICY_PREFIX}auto_promote")
        return cls(
            min_improvement=number("min_improvement", default.min_improvement),
            max_adherence_drop=number("max_adherence_drop", default.max_adherence_drop),
            auto_promote=default.auto_promote if auto is None else auto == "true",
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EvalFigures:
    """What an evaluation measured. ``scores[variant][score]``; ``reference`` is ``production``
    when the brand had a production version (``production_version``), else ``base``."""

    scores: dict[str, dict[str, float]]
    reference: str
    production_version: int | None = None
    prompts: int = 0
    heldout_images: int = 0

    def score(self, variant: str, name: str) -> float | None:
        return self.scores.get(variant, {}).get(name)

    def to_tags(self) -> dict[str, str]:
        tags = {
            f"{EVAL_PREFIX}reference": self.reference,
            f"{EVAL_PREFIX}prompts": str(self.prompts),
            f"{EVAL_PREFIX}heldout_images": str(self.heldout_images),
        }
        if self.production_version is not None:
            tags[f"{EVAL_PREFIX}production_version"] = str(self.production_version)
        for variant, scores in self.scores.items():
            for name, value in scores.items():
                tags[f"{EVAL_PREFIX}{variant}.{name}"] = f"{value:.6g}"
        return tags

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> EvalFigures | None:
        """The figures in a version's tags, or None for a version never evaluated."""
        reference = tags.get(f"{EVAL_PREFIX}reference")
        if reference not in ("base", "production"):
            return None
        scores: dict[str, dict[str, float]] = {}
        for variant in VARIANTS:
            for name in SCORES:
                raw = tags.get(f"{EVAL_PREFIX}{variant}.{name}")
                if raw is None:
                    continue
                try:
                    scores.setdefault(variant, {})[name] = float(raw)
                except ValueError:
                    continue
        production = tags.get(f"{EVAL_PREFIX}production_version")
        return cls(
            scores=scores,
            reference=reference,
            production_version=int(production) if production and production.isdigit() else None,
            prompts=int(tags.get(f"{EVAL_PREFIX}prompts", "0") or 0),
            heldout_images=int(tags.get(f"{EVAL_PREFIX}heldout_images", "0") or 0),
        )


@dataclass(frozen=True)
class GateDecision:
    """Whether a version may become ``production``, and the figures that decided it."""

    passed: bool
    evaluated: bool
    metric: str | None  # "brand_score" or "heldout_denoise_loss": what improvement measured
    improvement: float | None
    adherence_drop: float | None
    reference: str | None
    reasons: tuple[str, ...] = ()
    policy: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d

    def summary(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "passes its promotion gate"


def check_gate(figures: EvalFigures | None, policy: PromotionPolicy) -> GateDecision:
    """THE gate decision: the candidate against its reference under ``policy``."""
    if figures is None:
        return GateDecision(True, False, None, None, None, None, ("not evaluated",), asdict(policy))
    ref = figures.reference
    reasons = []
    improvement = adherence_drop = None
    metric = None
    cand_brand, ref_brand = (figures.score(v, "brand_score") for v in ("candidate", ref))
    cand_loss, ref_loss = (figures.score(v, "heldout_denoise_loss") for v in ("candidate", ref))
    if cand_brand is not None and ref_brand is not None:
        metric, improvement = "brand_score", cand_brand - ref_brand
    elif cand_loss is not None and ref_loss:
        metric, improvement = "heldout_denoise_loss", (ref_loss - cand_loss) / ref_loss
    if improvement is None:
        reasons.append("the evaluation measured nothing to compare (no held-out images)")
    elif improvement < policy.min_improvement:
        how = "brand_score gain" if metric == "brand_score" else "relative held-out loss drop"
        reasons.append(
            f"{how} over {ref} is {improvement:+.3f}, below min_improvement "
            f"{policy.min_improvement:+.3f}"
        )
    cand_adh, ref_adh = (figures.score(v, "prompt_adherence") for v in ("candidate", ref))
    if cand_adh is not None and ref_adh is not None:
        adherence_drop = ref_adh - cand_adh
        if adherence_drop > policy.max_adherence_drop:
            reasons.append(
                f"prompt adherence drops by {adherence_drop:.3f} from {ref}, more than "
                f"max_adherence_drop {policy.max_adherence_drop:.3f}"
            )
    return GateDecision(
        not reasons, True, metric, improvement, adherence_drop, ref, tuple(reasons), asdict(policy)
    )


class EvaluationFailed(RuntimeError):
    """``production`` may not point at the version: its gate failed (``decision`` says why)."""

    def __init__(self, version: AdapterVersion, decision: GateDecision) -> None:
        super().__init__(
            f"adapter {version.brand!r} version {version.version} fails its promotion gate: "
            f"{decision.summary()}; promote with force: true to override"
        )
        self.decision = decision


def read_policy(
    registry: AdapterRegistry, tenant: str, brand: str, default: PromotionPolicy
) -> PromotionPolicy:
    """The brand's policy (`AdapterNotFound` for a missing or foreign brand)."""
    return PromotionPolicy.from_tags(registry.brand_tags(tenant, brand), default)


def write_policy(
    registry: AdapterRegistry, tenant: str, brand: str, policy: PromotionPolicy
) -> PromotionPolicy:
    registry.set_brand_tags(tenant, brand, policy.to_tags())
    return policy


def gate_of(
    registry: AdapterRegistry,
    version: AdapterVersion,
    default: PromotionPolicy,
) -> GateDecision:
    """The gate decision of a registered version under its brand's current policy."""
    policy = read_policy(registry, version.tenant, version.brand, default)
    return check_gate(EvalFigures.from_tags(version.tags), policy)


def promote(
    registry: AdapterRegistry,
    tenant: str,
    brand: str,
    alias: str,
    version: int,
    *,
    default: PromotionPolicy,
    force: bool = False,
    by: str = "api",
) -> AdapterVersion:
    """Point ``alias`` at ``version``; for ``production`` only past the gate (or ``force``).

    `EvaluationFailed` when the gate fails and ``force`` is not set. A forced promotion past a
    failing gate tags the version (``promotion.forced_at``/``forced_reason``) and appends a note
    to its run."""
    if alias != PRODUCTION:
        return registry.set_alias(tenant, brand, alias, version)
    found = registry.get(tenant, brand, version)  # AdapterNotFound first, as before
    decision = gate_of(registry, found, default)
    if not decision.passed and not force:
        raise EvaluationFailed(found, decision)
    moved = registry.set_alias(tenant, brand, alias, version)
    if not decision.passed:
        record_forced(registry, moved, decision, by)
        moved = registry.get(tenant, brand, version)
    return moved


def record_forced(
    registry: AdapterRegistry, version: AdapterVersion, decision: GateDecision, by: str
) -> None:
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    reason = decision.summary()[:4000]
    registry.set_version_tags(
        version.tenant,
        version.brand,
        version.version,
        {FORCED_AT_TAG: stamp, FORCED_REASON_TAG: reason},
    )
    if version.run_id:
        registry.append_run_note(
            version.run_id,
            f"{stamp}: version {version.version} was promoted to production by force ({by}) "
            f"although its gate failed: {reason}",
        )


def default_policy(settings) -> PromotionPolicy:  # noqa: ANN001 - registry.settings.Settings
    """The farm's defaults, for brands that set no policy."""
    return PromotionPolicy(
        min_improvement=settings.promotion_min_improvement,
        max_adherence_drop=settings.promotion_max_adherence_drop,
    )


#: Tag of a new version: its gate decision under the brand's policy when its job ended.
GATE_TAG = f"{EVAL_PREFIX}gate"


def after_registration(
    registry: AdapterRegistry, version: AdapterVersion, default: PromotionPolicy
) -> tuple[GateDecision, bool]:
    """What a fine-tune does with its new version: tag the gate decision (``eval.gate``) and,
    with the brand's ``auto_promote``, make a passing version production through `promote`.
    Returns (decision, promoted)."""
    policy = read_policy(registry, version.tenant, version.brand, default)
    decision = check_gate(EvalFigures.from_tags(version.tags), policy)
    registry.set_version_tags(
        version.tenant,
        version.brand,
        version.version,
        {GATE_TAG: "pass" if decision.passed else "fail"},
    )
    if not (policy.auto_promote and decision.passed):
        return decision, False
    promote(registry, version.tenant, version.brand, PRODUCTION, version.version, default=default)
    return decision, True
