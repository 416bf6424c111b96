"""Brand adapters inside one pipeline: named slots (load, in-place swap, LRU eviction, pins) and
the per-row LoRA routing that lets one batch mix adapters and scales.

Plain Python over diffusers and peft; no Ray, no FastAPI. Not thread-safe by itself: the engine
calls it under its lock.
"""

from __future__ import annotations

import itertools
import warnings
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from serve.adapter_cache import AdapterWeights, adapter_incompatible
from serve.protocol import AdapterSpec

#: peft's name for "no adapter" in a mixed batch (`adapter_names`).
BASE = "__base__"
_ROUTED = "_brandfarm_routed"  # marks a module that carries our hooks

# peft narrates normal slot management (several adapters on one model, deleting the active
# one, which the next job replaces anyway); these are not problems here.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
warnings.filterwarnings("ignore", message=r"Adapter \S+ was active which is now deleted")


@dataclass(frozen=True)
class _Slot:
    """A named adapter in the pipeline and the shape of what it holds."""

    name: str
    signature: tuple


class AdapterSlots:
    """At most `max_adapters` brand adapters held by the pipeline, each under a slot name.

    A new adapter takes a free slot, or replaces the least recently used *unpinned* one: in
    place (diffusers' `hotswap`, a weight copy) when both have the same tensors and config, else
    by removing it and loading afresh. Same shapes and config mean the same arithmetic, so pixels
    never depend on which slot or path was used. A slot is pinned while a running row uses it;
    a pinned slot is never evicted, swapped or removed (a release waits until it is unpinned).
    """

    def __init__(self, pipeline, max_adapters: int) -> None:  # noqa: ANN001 - a diffusers pipeline
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be at least 1, got {max_adapters}")
        self.pipeline = pipeline
        self.max_adapters = max_adapters
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # model id -> slot, LRU first
        self._pins: dict[str, int] = {}
        self._released: deque[str] = deque()
        self._names = itertools.count()
        self.hotswaps = 0  # loads done in place (for tests and benchmarks)
        self.router = LoraRouter(pipeline)

    # --- queries ---------------------------------------------------------------------------

    def has(self, model_id: str) -> bool:
        return model_id in self._slots

    def loaded(self) -> list[str]:
        """Loaded adapter ids, least recently used first."""
        return list(self._slots)

    def slot_name(self, model_id: str) -> str:
        return self._slots[model_id].name

    def pipeline_names(self) -> set[str]:
        found: set[str] = set()
        for names in self.pipeline.get_list_adapters().values():
            found.update(names)
        return found

    def can_load_without_evicting_pinned(self, model_id: str) -> bool:
        if model_id in self._slots or len(self._slots) < self.max_adapters:
            return True
        return any(self._pins.get(m, 0) == 0 for m in self._slots)

    # --- pins and releases -----------------------------------------------------------------

    def pin(self, model_id: str) -> None:
        self._pins[model_id] = self._pins.get(model_id, 0) + 1

    def unpin(self, model_id: str) -> None:
        left = self._pins.get(model_id, 0) - 1
        if left > 0:
            self._pins[model_id] = left
        else:
            self._pins.pop(model_id, None)

    def pinned(self, model_id: str) -> bool:
        return self._pins.get(model_id, 0) > 0

    def release(self, model_id: str) -> None:
        """Queue a removal; safe from any thread (deque appends are atomic)."""
        self._released.append(model_id)

    def drain_releases(self, keep: Iterable[str] = ()) -> None:
        """Do the queued removals. A release of an adapter in `keep` (about to be used) is
        dropped, as is one of an adapter no longer loaded; one of a pinned adapter waits."""
        keep = set(keep)
        waiting: list[str] = []
        while self._released:
            model_id = self._released.popleft()
            if model_id in keep or model_id not in self._slots:
                continue
            if self.pinned(model_id):
                waiting.append(model_id)
            else:
                self.remove(model_id)
        self._released.extend(waiting)

    def remove(self, model_id: str) -> None:
        if self.pinned(model_id):
            raise RuntimeError(f"adapter {model_id} is in use by a running row")
        slot = self._slots.pop(model_id)
        self.pipeline.delete_adapters(slot.name)
        self.router.refresh()

    # --- loading ---------------------------------------------------------------------------

    def ensure_loaded(self, weights: AdapterWeights, spec: AdapterSpec) -> None:
        """Load the adapter unless it is there. One that does not fit the pipeline raises the
        `adapter_incompatible` `AdapterLoadError` and evicts nothing. Raises RuntimeError when
        every slot is pinned (the scheduler never asks for that)."""
        if weights.model_id != spec.model_id:
            raise ValueError(f"weights of {weights.model_id} given for {spec.model_id}")
        if spec.model_id in self._slots:
            self._slots.move_to_end(spec.model_id)
            return
        if not self.can_load_without_evicting_pinned(spec.model_id):
            raise RuntimeError(f"no unpinned slot for {spec.model_id}")
        unpinned = [m for m in self._slots if not self.pinned(m)]
        if len(self._slots) >= self.max_adapters and unpinned:
            victim_id = unpinned[0]
            victim = self._slots[victim_id]
            if victim.signature == weights.signature:
                del self._slots[victim_id]
                try:
                    self._inject(weights, victim.name, hotswap=True)
                except Exception:  # noqa: BLE001 - the slot may be half-written: drop it
                    self._forget_partial(victim.name)
                else:
                    self._slots[spec.model_id] = victim
                    self.hotswaps += 1
                    self.router.refresh()
                    return
        name = f"slot{next(self._names)}"
        try:
            self._inject(weights, name, hotswap=False)
        except Exception as e:  # noqa: BLE001 - diffusers/peft raise many kinds for a misfit
            self._forget_partial(name)
            raise adapter_incompatible(spec, f"{type(e).__name__}: {e}") from None
        if name not in self.pipeline_names():
            raise adapter_incompatible(spec, "no layer of the base model matches its keys")
        self._slots[spec.model_id] = _Slot(name, weights.signature)
        # Only now, so that a misfit evicts nothing: briefly one adapter over the limit.
        while len(self._slots) > self.max_adapters:
            self.remove(next(m for m in self._slots if not self.pinned(m)))
        self.router.refresh()

    def _inject(self, weights: AdapterWeights, name: str, hotswap: bool) -> None:
        """Load a parsed LoRA file into the pipeline under `name`, with the file's own LoRA
        config (rank, alpha, patterns) from its metadata, as `load_lora_weights(path)` would:
        given a bare state dict, diffusers would assume alpha = rank."""
        pipe = self.pipeline
        if not hasattr(pipe, "load_lora_into_unet"):
            raise TypeError(f"{type(pipe).__name__} has no UNet LoRA loader")
        # Copies: diffusers loads with low_cpu_mem_usage, which makes the pipeline's LoRA
        # parameters *be* the tensors it is given, and an in-place swap later writes into them;
        # the caller's tensors (the host-RAM tier's) must stay the adapter's own.
        owned = {key: tensor.clone() for key, tensor in weights.state_dict.items()}
        state_dict, network_alphas = pipe.lora_state_dict(owned)
        if not state_dict or not all("lora" in key for key in state_dict):
            raise ValueError("not a LoRA state dict: every key must contain 'lora'")
        common = {
            "network_alphas": network_alphas,
            "adapter_name": name,
            "metadata": weights.metadata,
            "_pipeline": pipe,
            "low_cpu_mem_usage": True,
            "hotswap": hotswap,
        }
        pipe.load_lora_into_unet(state_dict, unet=pipe.unet, **common)
        if any(key.startswith("text_encoder.") for key in state_dict):
            pipe.load_lora_into_text_encoder(
                state_dict, text_encoder=pipe.text_encoder, lora_scale=pipe.lora_scale, **common
            )

    def _forget_partial(self, name: str) -> None:
        """Remove whatever a failed load left behind under `name`."""
        if name in self.pipeline_names():
            self.pipeline.delete_adapters(name)
        self.router.refresh()


class LoraRouter:
    """Routes each row of a forward pass to its own adapters and scales.

    peft's LoRA layers take `adapter_names` (one per row) and then add each adapter's delta
    only to its rows (`_mixed_batch_forward`). As peft's own `generate(adapter_names=...)` does
    (`_enable_peft_forward_hooks`), a forward pre-hook on every LoRA layer passes the names of
    the current call. peft scales a delta by one number per adapter; rows of one adapter may
    have different scales, so the layer's number is held at 1.0 during a routed call and a
    forward hook on each `lora_B` multiplies its rows by the row's own
    `scale * lora_alpha / r` (peft's `set_scale` formula). A row's arithmetic is then exactly
    the solo path's `lora_B(lora_A(x)) * scaling` (times 1.0, which is exact).

    A row may combine several adapters. Its adapters are laid out in *lanes*: lane 0 holds
    each row's first adapter and goes through peft as above; lane j holds each row's j-th
    adapter (or none), and a forward hook on the LoRA layer adds those deltas after peft's,
    computed the way peft computes one (`lora_B(lora_A(x[rows]))` over that adapter's rows of
    the lane, scaled per row by the same `lora_B` hook). The caller lists a row's adapters in
    a canonical order (the engine sorts them by model id), so the sum is the same whatever
    order a request listed them in, bit for bit.

    Inside `invariant.batch_invariant()` the sub-batch products are batch-invariant too, so a
    delta does not depend on how many rows share its adapter (`serve.engine.denoise.step`).
    """

    def __init__(self, pipeline) -> None:  # noqa: ANN001 - a diffusers pipeline
        self.pipeline = pipeline
        self._lanes: list[list[str]] | None = None  # lane -> one slot name per row
        self._lane_scales: list[list[float]] | None = None
        self._lane = 0  # the lane whose `lora_B` calls run now
        self._layers: list = []  # the pipeline's LoRA layers, as of the last `refresh`

    def _lora_layers(self) -> Iterator:
        from peft.tuners.lora import LoraLayer

        for component in ("unet", "text_encoder"):
            model = getattr(self.pipeline, component, None)
            if model is None:
                continue
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    yield module

    def refresh(self) -> None:
        """Hook LoRA layers and `lora_B` modules that appeared since the last call (a load adds
        both; hooks on removed modules go with them). The slots call it after every change."""
        self._layers = list(self._lora_layers())
        for layer in self._layers:
            if not getattr(layer, _ROUTED, False):
                layer.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
                layer.register_forward_hook(self._add_lanes)
                setattr(layer, _ROUTED, True)
            for slot, lora_b in layer.lora_B.items():
                if not getattr(lora_b, _ROUTED, False):
                    lora_b.register_forward_hook(self._scale_rows(layer, slot))
                    setattr(lora_b, _ROUTED, True)

    @contextmanager
    def routing(self, names: list[tuple[str, ...]], scales: list[tuple[float, ...]]):
        """Within the block, row i of every LoRA layer's input adds the deltas of adapter slots
        `names[i]` (empty for the base model), in that order, at `scales[i]`."""
        if len(names) != len(scales) or any(
            len(n) != len(s) for n, s in zip(names, scales, strict=True)
        ):
            raise ValueError("one scale per adapter of each row")
        depth = max((len(n) for n in names), default=0)
        self._lanes = [[n[j] if j < len(n) else BASE for n in names] for j in range(max(depth, 1))]
        self._lane_scales = [
            [s[j] if j < len(s) else 0.0 for s in scales] for j in range(max(depth, 1))
        ]
        used = {slot for row in names for slot in row}
        held: list[tuple] = []
        try:
            for layer in self._layers:
                for slot in used & set(layer.scaling):
                    held.append((layer, slot, layer.scaling[slot]))
                    layer.scaling[slot] = 1.0
            yield
        finally:
            for layer, slot, value in held:
                layer.scaling[slot] = value
            self._lanes = self._lane_scales = None
            self._lane = 0

    def _pre_forward(self, module, args, kwargs):  # noqa: ANN001 - torch hook signature
        if self._lanes is not None:
            kwargs["adapter_names"] = self._lanes[0]
        return args, kwargs

    def _add_lanes(self, layer, args, output):  # noqa: ANN001, ANN202 - torch hook signature
        """Add the deltas of lanes 1.. to peft's output (lane 0), as `_mixed_batch_forward`
        computes one: over each adapter's rows, `lora_B(lora_A(dropout(x)))`."""
        if self._lanes is None or len(self._lanes) < 2:
            return output
        x = args[0]
        try:
            for lane in range(1, len(self._lanes)):
                self._lane = lane
                names = self._lanes[lane]
                for slot in dict.fromkeys(names):
                    if slot == BASE or slot not in layer.lora_A:
                        continue
                    rows = [i for i, n in enumerate(names) if n == slot]
                    lora_a = layer.lora_A[slot]
                    sub = x[rows].to(lora_a.weight.dtype)
                    delta = layer.lora_B[slot](lora_a(layer.lora_dropout[slot](sub)))
                    output[rows] += (delta * layer.scaling[slot]).to(output.dtype)
        finally:
            self._lane = 0
        return output

    def _scale_rows(self, layer, slot: str):  # noqa: ANN001 - a peft LoraLayer
        def hook(module, inputs, output):  # noqa: ANN001 - torch hook signature
            if self._lanes is None:
                return output
            # peft (and `_add_lanes`) feed lora_B the rows of `slot` in their batch order.
            names, row_scales = self._lanes[self._lane], self._lane_scales[self._lane]
            scales = [s for n, s in zip(names, row_scales, strict=True) if n == slot]
            if len(scales) != output.shape[0]:
                raise RuntimeError(f"{len(scales)} scales for {output.shape[0]} rows of {slot}")
            for scale in dict.fromkeys(scales):
                factor = self._peft_scaling(layer, slot, scale)
                rows = [i for i, s in enumerate(scales) if s == scale]
                if len(rows) == output.shape[0]:
                    output = output * factor
                else:
                    output[rows] = output[rows] * factor
            return output

        return hook

    @staticmethod
    def _peft_scaling(layer, slot: str, scale: float) -> float:  # noqa: ANN001
        """What peft's `LoraLayer.set_scale(slot, scale)` would store."""
        import math

        if layer.use_rslora.get(slot, False):
            return scale * layer.lora_alpha[slot] / math.sqrt(layer.r[slot])
        return scale * layer.lora_alpha[slot] / layer.r[slot]
