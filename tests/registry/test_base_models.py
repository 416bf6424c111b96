"""Base-model catalog: the tiny random model is built once and loaded through from_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.base_models import (
    TINY_RANDOM,
    BaseModelError,
    catalog_ids,
    describe,
    ensure_base_model,
    load_pipeline,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_base_model(TINY_RANDOM, tmp_path_factory.mktemp("models"), 1024)


def test_tiny_model_rules_come_from_its_configs(tiny):
    assert tiny.native_size == 64 and tiny.size_multiple == 8 and tiny.max_side == 256
    assert tiny.default_steps == 10
    assert len(tiny.revision) == 64
    assert TINY_RANDOM in catalog_ids()


def test_built_once_then_reused(tiny):
    again = ensure_base_model(TINY_RANDOM, Path(tiny.path).parent, 1024)
    assert again.revision == tiny.revision  # not rebuilt: the same bytes


def test_loads_with_from_pretrained_on_cpu(tiny):
    pipe = load_pipeline(tiny, "cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.device.type == "cpu"
    assert describe("x", Path(tiny.path), 100).max_side == 100


def test_unknown_model_is_actionable(tmp_path):
    with pytest.raises(BaseModelError, match="unknown base model 'nope'.*tiny-sd-random"):
        ensure_base_model("nope", tmp_path, 1024)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="no model_index.json"):
        ensure_base_model(str(tmp_path / "empty"), tmp_path, 1024)


def test_a_local_diffusers_folder_is_a_base_model(tiny, tmp_path):
    info = ensure_base_model(tiny.path, tmp_path, 1024)  # any folder with model_index.json
    assert info.id == tiny.path and info.revision == tiny.revision
    assert type(load_pipeline(info, "cpu")).__name__ == "StableDiffusionPipeline"
