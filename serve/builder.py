"""The Serve application builder a config file names (`import_path: serve.builder:app`).

Ray Serve calls `app(args)` on the cluster; `args` are settings fields, the rest (secrets,
endpoints) come from the `BRANDFARM_*` environment of the node it runs on.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from registry.base_models import ensure_base_model
from registry.settings import Settings
from serve.app import build_app


def app(args: dict[str, Any]) -> serve.Application:
    """Settings from `args` (+ env), the base model resolved once, then the farm's app."""
    settings = Settings(**args)
    model = ensure_base_model(
        settings.base_model, settings.state_path / "models", settings.max_image_side
    )
    return build_app(settings, model)
