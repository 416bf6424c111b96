"""LoRA adapters with random weights for a base model, in exactly the format `train_lora` writes.

Tests and benchmarks that need many distinct brand adapters (hot-swap pixel identity, cache
behaviour, switch costs) make them here in milliseconds instead of training each one. The file
is a real diffusers LoRA (peft layers on the UNet's attention projections, `LoraConfig` in the
safetensors metadata), so it goes through the same registry, loader and pipeline as a trained
adapter. `strength` scales the random B matrices: large enough that every adapter visibly
changes the image.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from finetune.train import LORA_TARGET_MODULES, LORA_WEIGHT_NAME


def write_random_lora(
    unet,  # noqa: ANN001 - a diffusers UNet2DConditionModel (left unchanged)
    out_dir: Path,
    *,
    seed: int,
    rank: int = 4,
    alpha: float | None = None,
    strength: float = 0.5,
    base_model_dir: str | Path | None = None,
) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` (and `lora_training.json` naming
    `base_model_dir`, which `AdapterRegistry.register` reads); returns the weights file."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights="gaussian",
        target_modules=list(LORA_TARGET_MODULES),
    )
    gen = torch.Generator("cpu").manual_seed(seed)
    name = f"synthetic{seed}"
    unet.add_adapter(config, adapter_name=name)
    try:
        state = get_peft_model_state_dict(unet, adapter_name=name)
        randomised = {
            key: torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
            * (strength if "lora_B" in key else 1.0 / rank**0.5)
            for key, tensor in state.items()
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        StableDiffusionPipeline.save_lora_weights(
            out_dir,
            unet_lora_layers=convert_state_dict_to_diffusers(randomised),
            weight_name=LORA_WEIGHT_NAME,
            safe_serialization=True,
            unet_lora_adapter_metadata=config.to_dict(),
        )
    finally:
        unet.delete_adapters(name)
    if base_model_dir is not None:
        summary = {
            "base_model": str(base_model_dir),
            "rank": rank,
            "alpha": config.lora_alpha,
            "synthetic_seed": seed,
        }
        (out_dir / "lora_training.json").write_text(json.dumps(summary) + "\n")
    return out_dir / LORA_WEIGHT_NAME


def random_lora_bytes(unet, *, seed: int, rank: int = 4, strength: float = 0.5) -> bytes:  # noqa: ANN001
    """The weights file `write_random_lora` would write, as bytes."""
    with tempfile.TemporaryDirectory(prefix="brandfarm-lora-") as tmp:
        return write_random_lora(
            unet, Path(tmp), seed=seed, rank=rank, strength=strength
        ).read_bytes()


def register_random_lora(
    registry,  # noqa: ANN001 - registry.adapters.AdapterRegistry
    mlflow_client,  # noqa: ANN001 - mlflow.MlflowClient on the same server
    tenant: str,
    brand: str,
    model,  # noqa: ANN001 - registry.base_models.BaseModelInfo the adapter is for
    unet,  # noqa: ANN001 - that model's UNet (or another model's, to make a misfit)
    folder: Path,
    *,
    seed: int,
    rank: int = 4,
    alias: str | None = "production",
):  # noqa: ANN201 - registry.adapters.AdapterVersion
    """Write a random LoRA to `folder` and register it as a new version of the tenant's brand
    the way a fine-tune job does (a run in an experiment, every lineage tag, verified upload);
    then point `alias` at it (None: leave the version at `staging` only)."""
    write_random_lora(unet, folder, seed=seed, rank=rank, base_model_dir=model.path)
    experiment = f"synthetic-adapters-{tenant}"
    found = mlflow_client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found else mlflow_client.create_experiment(experiment)
    run_id = mlflow_client.create_run(exp_id).info.run_id
    tags = {
        "base_model": model.id,
        "base_model_revision": model.revision,
        "dataset_sha256": "0" * 64,  # no dataset: random weights
        "job_id": f"synthetic-{seed}",
        "trigger_word": "zqx",
        "rank": rank,
        "alpha": rank,
        "steps": 0,
    }
    version = registry.register(tenant, brand, folder, run_id=run_id, tags=tags)
    mlflow_client.set_terminated(run_id)
    if alias is None:
        return version
    return registry.set_alias(tenant, brand, alias, version.version)
