"""The device plan: pure placement rules for CPU and 1..k GPUs, dtype choice, errors, and
`apply_plan` on the tiny real pipeline (CPU only)."""

from __future__ import annotations

import dataclasses

import pytest

from registry.base_models import build_tiny_random_sd, describe, load_pipeline
from serve.device_plan import (
    DevicePlan,
    DevicePlanError,
    apply_plan,
    component_bytes,
    plan_devices,
)

MB = 1024 * 1024
# fp32 parameter bytes of the real architectures (rounded).
SD15 = {"text_encoder": 492 * MB, "unet": 3438 * MB, "vae": 335 * MB}
SDXL = {
    "text_encoder": 492 * MB,
    "text_encoder_2": 2778 * MB,
    "unet": 10270 * MB,
    "vae": 335 * MB,
}
FLUX_LIKE = {"text_encoder": 492 * MB, "text_encoder_2": 9520 * MB, "transformer": 47600 * MB,
             "vae": 335 * MB}


def gpus(k: int) -> list[str]:
    return [f"cuda:{i}" for i in range(k)]


def loads(plan: DevicePlan, sizes: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, device in plan.placement.items():
        out[device] = out.get(device, 0) + sizes[name]
    return out


@pytest.mark.parametrize("sizes", [SD15, SDXL])
def test_cpu_puts_everything_on_cpu_in_fp32(sizes):
    plan = plan_devices(sizes, ["cpu"], bf16_supported=True)
    assert plan.placement == {name: "cpu" for name in sizes}
    assert plan.dtype == "float32"
    assert plan.attention == "sdpa"


@pytest.mark.parametrize("sizes", [SD15, SDXL])
def test_one_gpu_holds_everything(sizes):
    plan = plan_devices(sizes, ["cuda:3"])
    assert plan.placement == {name: "cuda:3" for name in sizes}
    assert plan.devices == ["cuda:3"]


def test_dtype_is_bf16_when_supported_else_fp16():
    assert plan_devices(SD15, gpus(1), bf16_supported=True).dtype == "bfloat16"
    assert plan_devices(SD15, gpus(2), bf16_supported=False).dtype == "float16"


def test_two_gpus_denoiser_alone_on_the_first():
    plan = plan_devices(SDXL, gpus(2))
    assert plan.placement == {
        "text_encoder": "cuda:1",
        "text_encoder_2": "cuda:1",
        "unet": "cuda:0",
        "vae": "cuda:1",
    }
    sd = plan_devices(SD15, gpus(2))
    assert sd.placement == {"text_encoder": "cuda:1", "unet": "cuda:0", "vae": "cuda:1"}


def test_three_gpus_balance_the_rest_by_bytes():
    plan = plan_devices(SDXL, gpus(3))
    # Largest first onto the least-loaded: text_encoder_2 → 1, text_encoder → 2, vae → 2.
    assert plan.placement == {
        "text_encoder": "cuda:2",
        "text_encoder_2": "cuda:1",
        "unet": "cuda:0",
        "vae": "cuda:2",
    }
    assert plan.devices == ["cuda:2", "cuda:1", "cuda:0"]


def test_four_gpus_each_component_its_own_gpu():
    plan = plan_devices(SDXL, gpus(4))
    assert plan.placement["unet"] == "cuda:0"
    assert sorted(plan.placement.values()) == gpus(4)
    # More GPUs than components: the extra GPUs stay unused, nothing fails.
    sd = plan_devices(SD15, gpus(4))
    assert sd.placement == {"text_encoder": "cuda:1", "unet": "cuda:0", "vae": "cuda:2"}


def test_transformer_counts_as_the_denoiser():
    plan = plan_devices(FLUX_LIKE, gpus(3))
    assert plan.placement["transformer"] == "cuda:0"
    assert plan.placement["text_encoder_2"] == "cuda:1"
    assert {plan.placement["text_encoder"], plan.placement["vae"]} == {"cuda:2"}


def test_without_denoiser_all_gpus_share_the_balance():
    sizes = {"a": 8, "b": 5, "c": 4, "d": 3}
    plan = plan_devices(sizes, gpus(2))
    # a → 0 (8); b → 1 (5); c → 1 (9); d → 0 (11): the greedy split.
    assert plan.placement == {"a": "cuda:0", "b": "cuda:1", "c": "cuda:1", "d": "cuda:0"}
    assert loads(plan, sizes) == {"cuda:0": 11, "cuda:1": 9}


def test_balance_is_never_worse_than_the_largest_item_over_the_mean():
    sizes = {f"m{i}": s for i, s in enumerate([7, 3, 9, 1, 4, 4, 6, 2, 8])}
    plan = plan_devices({"unet": 100, **sizes}, gpus(4))
    rest = loads(plan, {"unet": 0, **sizes})
    rest.pop("cuda:0")
    assert max(rest.values()) - min(rest.values()) <= max(sizes.values())


def test_plan_is_pure_and_keeps_component_order():
    first = plan_devices(SDXL, gpus(3))
    again = plan_devices(dict(SDXL), list(gpus(3)))
    assert first == again
    assert list(first.placement) == list(SDXL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.dtype = "float32"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("components", "devices", "message"),
    [
        ({}, ["cpu"], "no components"),
        (SD15, [], "no devices"),
        (SD15, ["cpu", "cuda:0"], "mix cpu and cuda"),
        (SD15, ["cuda:0", "cuda:0"], "more than once"),
        (SD15, ["cuda"], "unknown devices"),
        (SD15, ["mps"], "unknown devices"),
        ({"unet": -1}, ["cpu"], "negative"),
    ],
)
def test_bad_inputs_fail_loudly(components, devices, message):
    with pytest.raises(DevicePlanError, match=message):
        plan_devices(components, devices)


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    folder = build_tiny_random_sd(tmp_path_factory.mktemp("tiny") / "m")
    return load_pipeline(describe("tiny", folder, 1024), "cpu")


def test_component_bytes_of_the_tiny_pipeline(tiny_pipe):
    sizes = component_bytes(tiny_pipe)
    assert set(sizes) == {"text_encoder", "unet", "vae"}
    assert all(size > 0 for size in sizes.values())
    expected = sum(p.numel() * 4 for p in tiny_pipe.unet.parameters())  # fp32 on CPU
    assert sizes["unet"] == expected


def test_apply_plan_moves_components_and_casts(tiny_pipe):
    import torch

    plan = plan_devices(component_bytes(tiny_pipe), ["cpu"])
    assert apply_plan(tiny_pipe, plan) is tiny_pipe
    for name in plan.placement:
        param = next(getattr(tiny_pipe, name).parameters())
        assert param.device.type == "cpu"
        assert param.dtype == torch.float32

    half = DevicePlan({"vae": "cpu"}, "bfloat16")
    apply_plan(tiny_pipe, half)
    assert next(tiny_pipe.vae.parameters()).dtype == torch.bfloat16
    assert next(tiny_pipe.unet.parameters()).dtype == torch.float32  # unplanned: untouched
    apply_plan(tiny_pipe, plan)  # back to fp32 for any later test
    assert next(tiny_pipe.vae.parameters()).dtype == torch.float32


def test_apply_plan_names_a_missing_component(tiny_pipe):
    with pytest.raises(DevicePlanError, match="no component 'transformer'"):
        apply_plan(tiny_pipe, DevicePlan({"transformer": "cpu"}, "float32"))
