"""A job's checkpoints in a real object store (the embedded rclone S3): only the newest
`fine_tune_checkpoints_keep` stay while it runs, and none once it has ended."""

from __future__ import annotations

import pytest
import torch

from cluster.processes import free_ports
from cluster.stack import LocalStack
from finetune import checkpoints
from finetune.job import JobReporter, checkpoint_steps, discard_job_objects
from registry.db import make_engine
from registry.jobs import JobStore
from registry.settings import Settings
from registry.storage import ObjectStore
from registry.tenants import TenantDirectory


@pytest.fixture(scope="module")
def s3_settings(tmp_path_factory):
    state = tmp_path_factory.mktemp("s3") / "state"
    [port] = free_ports(1)
    stack = LocalStack(Settings(state_dir=state, s3_port=port, fine_tune_checkpoints_keep=2))
    stack.start("s3")
    try:
        yield stack.resolved_settings()
    finally:
        stack.component("s3").stop()


def _state(step: int) -> dict:
    """A checkpoint state shaped like `train_lora`'s (tiny tensors)."""
    w = torch.full((2, 2), float(step))
    return {
        "step": step,
        "lora": {"unet.a.lora_A.weight": w},
        "optimizer": {
            "state": {0: {"step": torch.tensor(float(step)), "exp_avg": w * 0.5}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}],
        },
        "generator": torch.Generator().manual_seed(step).get_state(),
        "losses": [0.5] * step,
    }


def test_keeps_the_newest_checkpoints_and_deletes_all_when_the_job_ends(s3_settings):
    engine = make_engine(s3_settings.resolved_database_url)
    TenantDirectory(engine).create_tenant("acme")
    jobs = JobStore(engine)
    job, _ = jobs.create("acme", "brand", "file-1", "m", {})
    reporter = JobReporter(s3_settings, job)
    for step in (4, 8, 12, 16):
        reporter.save_checkpoint(step, _state(step))
    store = ObjectStore.from_settings(s3_settings)
    assert [s for s, _ in checkpoint_steps(store, job)] == [12, 16]
    names = sorted(o.key.rsplit("/", 1)[-1] for o in store.list(f"tenants/acme/jobs/{job.id}/"))
    assert names == [
        "step-000012.json",
        "step-000012.safetensors",
        "step-000016.json",
        "step-000016.safetensors",
    ]
    latest = reporter.latest_checkpoint()
    assert latest["step"] == 16 and torch.equal(
        latest["lora"]["unet.a.lora_A.weight"], _state(16)["lora"]["unet.a.lora_A.weight"]
    )
    # A checkpoint whose JSON part never arrived (a crash between the two puts) is not one.
    tensors, _ = checkpoints.encode(_state(20))
    store.put_bytes(f"tenants/acme/jobs/{job.id}/checkpoints/step-000020.safetensors", tensors)
    assert reporter.latest_checkpoint(announce=False)["step"] == 16
    # The adapter hand-off of a data-parallel job goes too: only the registry keeps the result.
    store.put_bytes(f"tenants/acme/jobs/{job.id}/adapter/pytorch_lora_weights.safetensors", b"x")
    other, _ = jobs.create("acme", "brand", "file-1", "m", {})
    JobReporter(s3_settings, other).save_checkpoint(4, _state(4))
    assert discard_job_objects(store, job) == 6
    assert store.list(f"tenants/acme/jobs/{job.id}/") == []
    assert [s for s, _ in checkpoint_steps(store, other)] == [4]  # another job's stay
