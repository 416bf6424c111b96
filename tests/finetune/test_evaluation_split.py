"""The held-out split of a fine-tune's dataset: deterministic, disjoint, at most a quarter."""

from __future__ import annotations

import pytest

from finetune import world
from finetune.evaluation import eval_prompts, split_heldout


def test_heldout_images_are_never_in_the_training_part_and_the_split_repeats() -> None:
    examples = list(world.generate_brand("acme", 10, seed=3))
    train, held = split_heldout(examples, 4, seed=7)
    assert len(held) == 2 and len(train) == 8  # a quarter of 10, rounded down
    assert not {id(e) for e in held} & {id(e) for e in train}
    again_train, again_held = split_heldout(examples, 4, seed=7)
    assert [c for _, c in again_held] == [c for _, c in held]
    assert [id(e) for e in again_train] == [id(e) for e in train]
    assert len(split_heldout(examples, 0, seed=7)[1]) == 0
    assert len(split_heldout(examples[:3], 4, seed=7)[1]) == 0  # too few to spare one


def test_eval_prompts_are_the_jobs_own_else_the_heldout_captions() -> None:
    held = list(world.generate_brand("acme", 3, seed=1))
    assert eval_prompts(None, held, 8) == [c for _, c in held]
    assert eval_prompts(["a red circle on a blue background"], held, 8) == [
        "a red circle on a blue background"
    ]
    assert len(eval_prompts(None, held, 2)) == 2


@pytest.mark.slow  # loads the built-in pipeline
def test_a_crash_inside_the_evaluation_is_evaluation_crashed(tmp_path) -> None:
    """Any error inside the evaluation (here: the adapter folder is missing) comes out as
    `EvaluationCrashed`, which the worker turns into a failed job before `register` runs."""
    import datetime as dt

    from finetune.job import EvaluationCrashed, Worker
    from registry.adapters import AdapterRegistry
    from registry.base_models import SHAPES, ensure_base_model
    from registry.jobs import JobRecord
    from registry.settings import Settings

    settings = Settings(state_dir=tmp_path / "state", device="cpu")
    base = ensure_base_model(SHAPES, tmp_path / "models", settings.max_image_side)
    job = JobRecord(
        "ftjob-x", "crash-co", "acme", "file-x", SHAPES, {"seed": 1}, "running",
        dt.datetime.now(dt.UTC), None, None, None, None, 1, False, None,
    )  # fmt: skip
    examples = list(world.generate_brand("acme", 4, seed=1))
    registry = AdapterRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    worker = Worker.__new__(Worker)  # no database needed before the evaluation's first event
    worker.settings = settings
    with pytest.raises(EvaluationCrashed, match="evaluation failed"):
        worker._evaluate(job, base, tmp_path / "no-adapter", examples, examples[:1], registry)
