"""The held-out split of a fine-tune's dataset: deterministic, disjoint, at most a quarter."""

from __future__ import annotations

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
