"""Where a replica's pipeline components live and in which dtype: a pure plan, then the mover.

`plan_devices` decides from (component sizes, the replica's devices, bf16 support) only, so it is
unit-tested without a GPU. `dispatch_plan` carries a plan out on a loaded diffusers pipeline:
one device is a plain `.to(device)`; several devices get accelerate hooks, as diffusers'
own `device_map="balanced"` does, but following this plan (see `dispatch_plan`).
`registry.base_models.load_pipeline` is the caller. Lives in `registry/` beside it because the
registry may import nothing of the other packages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# The component that runs every denoising step; the others run once per request.
DENOISERS = ("unet", "transformer")
_CUDA = re.compile(r"cuda:\d+")


class DevicePlanError(ValueError):
    """The components or devices given to `plan_devices` cannot be planned."""


@dataclass(frozen=True)
class DevicePlan:
    """Where each component goes (`placement`), the weights' dtype and the attention kernel."""

    placement: dict[str, str]
    dtype: str  # a torch dtype name: "float32", "bfloat16" or "float16"
    attention: str = "sdpa"  # torch's scaled_dot_product_attention (diffusers' default on torch 2)

    @property
    def devices(self) -> list[str]:
        """The distinct devices the plan uses, in first-use order."""
        return list(dict.fromkeys(self.placement.values()))


def _check(components: dict[str, int], devices: list[str]) -> bool:
    """Validate the inputs; True when the devices are CUDA devices."""
    if not components:
        raise DevicePlanError("no components to place: pass {component name: parameter bytes}")
    negative = sorted(name for name, size in components.items() if size < 0)
    if negative:
        raise DevicePlanError(f"negative parameter bytes for {', '.join(negative)}")
    if not devices:
        raise DevicePlanError("no devices: pass ['cpu'] or the replica's ['cuda:0', ...]")
    if len(set(devices)) != len(devices):
        raise DevicePlanError(f"devices listed more than once: {devices}")
    if devices == ["cpu"]:
        return False
    if "cpu" in devices:
        raise DevicePlanError(
            f"devices mix cpu and cuda ({devices}); a replica renders on CPU or on its GPUs"
        )
    bad = [d for d in devices if not _CUDA.fullmatch(d)]
    if bad:
        raise DevicePlanError(f"unknown devices {bad}: use 'cpu' or 'cuda:<index>'")
    return True


def plan_dtype(devices: list[str], bf16_supported: bool = True) -> str:
    """The weights' dtype on `devices`: float32 on CPU (half precision there is slow or
    unsupported); on CUDA bfloat16 when supported (Ampere and newer), else float16. Known before
    any weight is loaded, so the pipeline is loaded in it directly."""
    if devices == ["cpu"]:
        return "float32"
    return "bfloat16" if bf16_supported else "float16"


def plan_devices(
    components: dict[str, int], devices: list[str], bf16_supported: bool = True
) -> DevicePlan:
    """Place `components` ({name: parameter bytes}) on `devices`.

    Rules:
    - `["cpu"]`: everything on CPU in float32 (`plan_dtype`).
    - CUDA: bfloat16 when `bf16_supported` (Ampere and newer), else float16.
    - One GPU: everything on it.
    - k > 1 GPUs: the denoiser (`unet` or `transformer`), which runs every step, gets the first GPU
      to itself; the other components (text encoders, VAE) are balanced by bytes over the
      remaining GPUs, largest first onto the least-loaded GPU (ties: the lower index). Without a
      denoiser all components are balanced over all GPUs the same way.
    The result depends only on the arguments (ties broken by name), so it is reproducible.
    """
    on_cuda = _check(components, devices)
    dtype = plan_dtype(devices, bf16_supported)
    if not on_cuda:
        return DevicePlan({name: "cpu" for name in components}, dtype)
    if len(devices) == 1:
        return DevicePlan({name: devices[0] for name in components}, dtype)

    placement: dict[str, str] = {}
    denoiser = next((name for name in DENOISERS if name in components), None)
    rest_devices = devices
    if denoiser is not None:
        placement[denoiser] = devices[0]
        rest_devices = devices[1:]
    load = {device: 0 for device in rest_devices}
    rest = sorted((n for n in components if n != denoiser), key=lambda n: (-components[n], n))
    for name in rest:
        target = min(rest_devices, key=lambda d: load[d])  # min() keeps the first on ties
        placement[name] = target
        load[target] += components[name]
    return DevicePlan({name: placement[name] for name in components}, dtype)


def component_bytes(pipe: Any) -> dict[str, int]:
    """{component name: parameter bytes} of a diffusers pipeline's torch modules (the input of
    `plan_devices`); tokenizers, schedulers and absent components are left out."""
    import torch

    sizes = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            sizes[name] = sum(p.numel() * p.element_size() for p in module.parameters())
    return sizes


def apply_plan(pipe: Any, plan: DevicePlan) -> Any:
    """Move each planned component of `pipe` to its device and dtype; returns `pipe`.

    Components on different GPUs need their inputs moved between them: `dispatch_plan` adds
    that; `.to` alone only places the weights.
    """
    import torch

    dtype = getattr(torch, plan.dtype)
    for name, device in plan.placement.items():
        module = getattr(pipe, name, None)
        if module is None:
            raise DevicePlanError(f"the pipeline has no component {name!r} to place")
        module.to(device, dtype)
    return pipe


def visible_devices(device: str) -> list[str]:
    """The devices a replica renders on: `cpu`, one named GPU (`cuda:1`), or for `cuda` every
    GPU this process sees (a Ray replica with k GPUs sees cuda:0..k-1, its own)."""
    if device == "cpu" or _CUDA.fullmatch(device):
        return [device]
    if device != "cuda":
        raise DevicePlanError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:<index>'")
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise DevicePlanError("device 'cuda' was asked for but this process sees no GPU")
    return [f"cuda:{i}" for i in range(count)]


def use_sdpa(pipe: Any) -> None:
    """Attention through torch's scaled_dot_product_attention: replace any legacy (non-SDPA)
    `AttnProcessor` left on a component; other processors (SDPA, LoRA, IP-adapter) stay."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for module in pipe.components.values():
        processors = getattr(module, "attn_processors", None)
        if processors and any(type(p) is AttnProcessor for p in processors.values()):
            module.set_attn_processor(
                {
                    key: AttnProcessor2_0() if type(p) is AttnProcessor else p
                    for key, p in processors.items()
                }
            )


def attach_device_hooks(pipe: Any, plan: DevicePlan) -> Any:
    """Let components on different devices call each other: an accelerate `AlignDevicesHook`
    on each planned component (and its sub-modules) moves inputs to that component's device and
    its outputs back to the caller's, and `hf_device_map` marks the pipeline as device-mapped.
    This is what diffusers' `device_map="balanced"` sets up, with our placement; diffusers'
    LoRA loading sees `hf_device_map` and keeps these hooks (it strips offloading hooks only)."""
    from accelerate import dispatch_model

    for name, device in plan.placement.items():
        dispatch_model(getattr(pipe, name), device_map={"": device}, force_hooks=True)
    pipe.hf_device_map = dict(plan.placement)
    return pipe


def dispatch_plan(pipe: Any, plan: DevicePlan) -> Any:
    """Carry `plan` out on a pipeline loaded in `plan.dtype`: one device, `pipe.to(device)`
    (every component, tokenizers and schedulers included, as diffusers does); several devices,
    each component to its own (`apply_plan`) plus `attach_device_hooks`. Then SDPA attention."""
    if len(plan.devices) == 1:
        pipe = pipe.to(plan.devices[0])
    else:
        attach_device_hooks(apply_plan(pipe, plan), plan)
    if plan.attention == "sdpa":
        use_sdpa(pipe)
    return pipe
