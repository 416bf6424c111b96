"""Near-duplicate rate of the built-in model's renders against its own training set.

The built-in model was trained on `world.generate(dataset_size, seed, train_combos)` (its
training.json records both). This renders every training combo's caption and every held-out
combo's caption with a few seeds, hashes everything with the farm's pHash
(`registry.near_duplicates`), and prints, per prompt set, how many renders lie within Hamming
distance d of some training image, for several d (the farm's default threshold is 6). A
control row does the same for fresh world images that were never trained on: in a world this
simple, any image of "a red circle on a blue background" resembles many training images, and the
control says how much of the rate that explains.

    python bench/near_duplicates.py [--seeds 2] [--training 20000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from finetune import world  # noqa: E402
from finetune.base_model import load_defaults, render_at_defaults  # noqa: E402
from registry.base_models import SHAPES, ensure_base_model, load_pipeline  # noqa: E402
from registry.near_duplicates import HashSet, phash  # noqa: E402

THRESHOLDS = (0, 2, 4, 6, 8, 10, 12)


def nearest_distances(training: HashSet, images) -> list[int]:  # noqa: ANN001 - PIL images
    return [training.nearest(phash(image)).distance for image in images]


def row(name: str, distances: list[int]) -> str:
    rates = "  ".join(f"{np.mean(np.array(distances) <= d):6.1%}" for d in THRESHOLDS)
    return f"{name:<28} {len(distances):5d}  {rates}  median {int(np.median(distances))}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2, help="Renders per prompt.")
    p.add_argument("--training", type=int, default=None, help="Training images to hash.")
    args = p.parse_args()
    torch.set_num_threads(1)

    model = ensure_base_model(SHAPES, Path("/tmp"), 1024)
    record = json.loads((Path(model.path) / "training.json").read_text())
    size = record["config"]["resolution"]
    count = args.training or record["config"]["dataset_size"]
    started = time.perf_counter()
    pairs = world.generate(count, record["seed"], world.train_combos(), size)
    values = np.array([phash(image) for image, _ in pairs], dtype=np.uint64)
    training = HashSet(values, ("training",) * count, ("-",) * count, ("-",) * count)
    print(f"hashed {count} training images in {time.perf_counter() - started:.0f} s")

    pipe = load_pipeline(model, "cpu")
    pipe.set_progress_bar_config(disable=True)
    defaults = load_defaults(model.path)
    header = "  ".join(f"<= {d:>2}" for d in THRESHOLDS)
    print(f"\n{'renders of':<28} {'n':>5}  {header}")
    for name, combos in (
        ("training combos", world.train_combos()),
        ("held-out combos", world.heldout_combos()),
    ):
        prompts = [world.caption(c) for c in combos] * args.seeds
        images = render_at_defaults(pipe, defaults, prompts, seed=4321)
        print(row(name, nearest_distances(training, images)))
    fresh = [
        image for image, _ in world.generate(len(world.train_combos()) * args.seeds, 99, None, size)
    ]
    print(row("control: fresh world images", nearest_distances(training, fresh)))


if __name__ == "__main__":
    main()
