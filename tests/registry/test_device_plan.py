"""The device plan: pure placement rules for CPU and 1..k GPUs, dtype choice, errors; then, on
the tiny real pipeline (CPU only), `apply_plan`, the multi-device hooks and `load_pipeline`."""

from __future__ import annotations

import dataclasses

import pytest

from registry.base_models import build_tiny_random_sd, describe, load_pipeline
from registry.device_plan import (
    DevicePlan,
    DevicePlanError,
    apply_plan,
    attach_device_hooks,
    component_bytes,
    dispatch_plan,
    plan_devices,
    plan_dtype,
    use_sdpa,
    visible_devices,
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
FLUX_LIKE = {
    "text_encoder": 492 * MB,
    "text_encoder_2": 9520 * MB,
    "transformer": 47600 * MB,
    "vae": 335 * MB,
}


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
def tiny_info(tmp_path_factory):
    return describe("tiny", build_tiny_random_sd(tmp_path_factory.mktemp("tiny") / "m"), 1024)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_info):
    return load_pipeline(tiny_info, "cpu")


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


def test_dtype_is_known_before_loading():
    assert plan_dtype(["cpu"], bf16_supported=True) == "float32"
    assert plan_dtype(["cuda:0", "cuda:1"], bf16_supported=True) == "bfloat16"
    assert plan_dtype(["cuda:0"], bf16_supported=False) == "float16"
    for devices in (["cpu"], gpus(1), gpus(3)):
        assert plan_devices(SD15, devices, False).dtype == plan_dtype(devices, False)


def test_visible_devices(monkeypatch):
    import torch

    assert visible_devices("cpu") == ["cpu"]
    assert visible_devices("cuda:3") == ["cuda:3"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(DevicePlanError, match="sees no GPU"):
        visible_devices("cuda")
    # A Ray replica with k GPUs sees exactly its own k, renumbered from 0.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert visible_devices("cuda") == ["cuda:0", "cuda:1"]
    with pytest.raises(DevicePlanError, match="unknown device 'mps'"):
        visible_devices("mps")


def render(pipe, seed: int = 3):
    import numpy as np
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(
        "a red circle",
        num_inference_steps=3,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=generator,
        output_type="np",
    )
    return np.asarray(out.images[0])


def test_load_pipeline_on_cpu_is_plain_diffusers_bit_for_bit(tiny_info):
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    info = tiny_info
    plain = DiffusionPipeline.from_pretrained(info.path, dtype=torch.float32).to("cpu")
    plain.set_progress_bar_config(disable=True)
    ours = load_pipeline(info, "cpu")
    assert ours.hf_device_map is None  # one device: no hooks
    for name in component_bytes(ours):
        param = next(getattr(ours, name).parameters())
        assert (param.device.type, param.dtype) == ("cpu", torch.float32)
    assert {type(p).__name__ for p in ours.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert np.array_equal(render(ours), render(plain))


def test_use_sdpa_replaces_only_the_legacy_processor(tiny_pipe):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    tiny_pipe.unet.set_attn_processor(AttnProcessor())
    use_sdpa(tiny_pipe)
    assert all(type(p) is AttnProcessor2_0 for p in tiny_pipe.unet.attn_processors.values())


def test_several_devices_get_hooks_that_render_the_same_and_survive_a_lora(tiny_info):
    """The multi-GPU branch of `dispatch_plan`, run with CPU as every "device": each component
    gets an accelerate hook on its planned device, the pipeline renders exactly what the plain
    one does, and diffusers' LoRA loading keeps the hooks (it sees `hf_device_map`)."""
    import numpy as np
    from accelerate.hooks import AlignDevicesHook
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    info = tiny_info
    plain = load_pipeline(info, "cpu")
    expected = render(plain)
    # A LoRA state dict as a fine-tune writes it (peft keys under "unet.").
    plain.unet.add_adapter(
        LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False)
    )
    lora = {f"unet.{k}": v.clone() for k, v in get_peft_model_state_dict(plain.unet).items()}

    hooked = load_pipeline(info, "cpu")
    plan = DevicePlan({"unet": "cpu", "text_encoder": "cpu", "vae": "cpu"}, "float32")
    attach_device_hooks(apply_plan(hooked, plan), plan)
    assert hooked.hf_device_map == plan.placement
    for name in plan.placement:
        hook = getattr(hooked, name)._hf_hook
        assert isinstance(hook, AlignDevicesHook) and str(hook.execution_device) == "cpu"
    assert np.array_equal(render(hooked), expected)

    hooked.load_lora_weights(lora, adapter_name="brand")
    hooked.set_adapters(["brand"], [1.0])
    assert isinstance(hooked.unet._hf_hook, AlignDevicesHook)  # not stripped as "offloading"
    assert not np.array_equal(render(hooked), expected)  # the adapter is active through hooks


def test_dispatch_plan_on_one_device_moves_everything(tiny_pipe):
    plan = plan_devices(component_bytes(tiny_pipe), ["cpu"])
    assert dispatch_plan(tiny_pipe, plan) is tiny_pipe
    assert tiny_pipe.hf_device_map is None
