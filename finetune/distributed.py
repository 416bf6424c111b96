"""Data-parallel fine-tuning on N Ray Train workers (one `train_lora` process per worker).

Gradients are all-reduced by accelerate's DDP (gloo on CPU, NCCL on GPU); each worker draws
its own batches. Rank 0 reports progress, writes checkpoints and uploads the adapter through
the job's `JobReporter`; every rank polls the cancel flag and agrees on it in an all-reduce, so
all stop at the same step.
"""

from __future__ import annotations

from finetune.job import JobReporter, train_kwargs


def _train_worker(config: dict) -> None:
    import tempfile
    from pathlib import Path

    import ray.train
    import torch
    import torch.distributed as dist

    from finetune.train import train_lora

    reporter: JobReporter = config["reporter"]
    rank = ray.train.get_context().get_world_rank()
    kwargs = train_kwargs(reporter.job, reporter.settings)
    resume = reporter.latest_checkpoint(announce=False) if config["resume"] else None
    if resume is not None:
        # Each rank continues with a random stream of its own (rank 0's was checkpointed).
        rng = torch.Generator().manual_seed(kwargs["seed"] * 1009 + rank * 7919 + resume["step"])
        resume = {**resume, "generator": rng.get_state()}
    kwargs["seed"] += rank  # distinct batches per rank; DDP syncs the weights from rank 0

    def should_stop() -> bool:
        flag = torch.tensor([1.0 if reporter.should_stop() else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "adapter"
        train_lora(
            config["base_path"],
            reporter.training_split()[0],
            out,
            progress=reporter.progress if rank == 0 else None,
            on_checkpoint=reporter.save_checkpoint if rank == 0 else None,
            resume=resume,
            should_stop=should_stop,
            **kwargs,
        )
        if rank == 0:
            reporter.upload_adapter(out)


def train_data_parallel(reporter: JobReporter, base_path: str, workers: int, resume: bool) -> None:
    """Run the job's training on `workers` Ray Train workers; raises `TrainingStopped` when the
    job was cancelled, `RuntimeError` when a worker failed."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from finetune.train import TrainingStopped

    settings = reporter.settings
    if not ray.is_initialized():
        ray.init()  # the Ray job's RAY_ADDRESS: the farm's cluster
    use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"reporter": reporter, "base_path": base_path, "resume": resume},
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": settings.fine_tune_cpus_per_worker}
            | ({"GPU": 1} if use_gpu else {}),
        ),
        run_config=RunConfig(name=reporter.job.id, storage_path=str(settings.state_path / "ray")),
    )
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray wraps the workers' errors
        if reporter.should_stop():
            raise TrainingStopped("cancelled during data-parallel training") from e
        raise RuntimeError(f"data-parallel training failed: {e}") from e
