"""A brand's canary: `production` split between a champion and a challenger version.

The state lives in the MLflow registry, on the brand's registered model, where operators see it
in the MLflow UI next to the versions: the challenger is the alias ``challenger`` (the champion
is whatever ``production`` points at) and its traffic share is the registered-model tag
``canary.share``. `assign` decides, from a render id alone, which of the two a render uses, so
every ingress replica and every retry of the same render agrees without shared state.

Pure Python: the ingress and its tests import it without MLflow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from registry.adapter_refs import PRODUCTION

#: The alias that marks the challenger version (MLflow's own champion/challenger naming).
CHALLENGER = "challenger"
#: Registered-model tags holding the challenger's traffic share (0..1) and when it started.
SHARE_TAG, STARTED_TAG = "canary.share", "canary.started_at"

Role = Literal["champion", "challenger"]


def bucket(render_id: str, brand: str) -> float:
    """Where a render falls in [0, 1): a stable hash of its render id (and the brand, so that a
    render naming two canaried brands draws independently for each)."""
    digest = hashlib.sha256(f"{brand}\n{render_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class Canary:
    """The challenger version of a brand's `production` alias and its share of renders."""

    challenger: int
    share: float
    started_at: str | None = None  # ISO 8601 (UTC), when this challenger started
    champion: int | None = None  # the production version when this was read

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"share {self.share!r} is invalid: use a number from 0 to 1")

    def assign(self, render_id: str, brand: str, champion: int) -> tuple[int, Role]:
        """The version render `render_id` uses, and whether it is the champion or challenger."""
        if bucket(render_id, brand) < self.share:
            return self.challenger, "challenger"
        return champion, "champion"

    @classmethod
    def from_model(cls, aliases: dict[str, str], tags: dict[str, str]) -> Canary | None:
        """The canary a registered model's aliases and tags hold; None without a challenger
        alias. A share tag that is missing or not a number in 0..1 (set by hand) reads as 0:
        the champion keeps every render."""
        challenger = aliases.get(CHALLENGER)
        if challenger is None:
            return None
        try:
            share = float(tags.get(SHARE_TAG, "0"))
        except ValueError:
            share = 0.0
        share = share if 0.0 <= share <= 1.0 else 0.0
        champion = aliases.get(PRODUCTION)
        return cls(
            int(challenger),
            share,
            tags.get(STARTED_TAG),
            int(champion) if champion is not None else None,
        )
