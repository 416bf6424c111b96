"""The diffusion engine: owns one diffusers pipeline and turns a `RenderJob` into PNG bytes.

Plain Python: no Ray, no FastAPI. The Ray Serve replica wraps it; tests, benchmarks and GPU
boxes without Ray use it directly.
"""

from __future__ import annotations

import io
import itertools
import json
import threading
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from registry.base_models import BaseModelInfo, load_pipeline, select_device
from serve.adapter_cache import AdapterWeights, adapter_incompatible
from serve.protocol import AdapterSpec, RenderedImage, RenderJob


def encode_png(image: Image.Image, metadata: dict[str, str | int | float | None]) -> bytes:
    """PNG bytes with each metadata item as a tEXt chunk, plus all of it as JSON `parameters`."""
    info = PngInfo()
    for key, value in metadata.items():
        if value is not None:
            info.add_text(key, str(value))
    info.add_text("parameters", json.dumps(metadata, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


# peft narrates normal slot management (several adapters on one model, deleting the active
# one, which the next job replaces anyway); these are not problems here.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
warnings.filterwarnings("ignore", message=r"Adapter \S+ was active which is now deleted")


@dataclass(frozen=True)
class _Slot:
    """A named adapter in the pipeline and the shape of what it holds."""

    name: str
    signature: tuple


class DiffusionEngine:
    """Renders jobs on one pipeline. One job at a time: a pipeline is not re-entrant.

    Brand adapters live in named pipeline slots and are activated per job with the job's scale,
    all under the one lock, so an image is always rendered with exactly its job's adapter and
    never with a mix. At most `max_adapters` slots exist. A new adapter takes a free slot, or
    replaces the least recently used one: in place (diffusers' `hotswap`, a weight copy) when
    both have the same tensors and config, else by removing it and loading afresh. Same shapes
    and config mean the same arithmetic, so pixels never depend on which slot or path was used.
    `release_adapter` (the Serve multiplexer's eviction) only queues a removal, done under the
    lock at the next call; a job carries its `AdapterWeights`, so an adapter removed meanwhile is
    loaded again.
    """

    def __init__(self, pipeline, model: BaseModelInfo, device: str, max_adapters: int = 8) -> None:
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be at least 1, got {max_adapters}")
        self.pipeline = pipeline
        self.model = model
        self.device = device
        self.max_adapters = max_adapters
        self._lock = threading.Lock()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # model id -> slot, LRU first
        self._released: deque[str] = deque()
        self._names = itertools.count()
        self.hotswaps = 0  # loads done in place (for tests and benchmarks)

    @classmethod
    def load(
        cls, model: BaseModelInfo, device: str = "auto", max_adapters: int = 8
    ) -> DiffusionEngine:
        resolved = select_device(device)
        return cls(load_pipeline(model, resolved), model, resolved, max_adapters)

    # --- adapters ----------------------------------------------------------------------------

    def has_adapter(self, model_id: str) -> bool:
        """Whether the adapter is loaded in the pipeline now."""
        return model_id in self._slots

    def loaded_adapters(self) -> list[str]:
        """Loaded adapter ids, least recently used first."""
        return list(self._slots)

    def slot_names(self) -> list[str]:
        """The pipeline's adapter names, as diffusers lists them."""
        return sorted(self._pipeline_adapters())

    def load_adapter(self, weights: AdapterWeights, spec: AdapterSpec) -> None:
        """Load the adapter into the pipeline if it is not there yet. One that does not fit the
        pipeline raises the `adapter_incompatible` `AdapterLoadError` and evicts nothing."""
        with self._lock:
            self._drain_releases(keep=spec.model_id)
            self._ensure_loaded(weights, spec)

    def unload_adapter(self, model_id: str) -> None:
        """Remove the adapter from the pipeline now (waits for a running render)."""
        with self._lock:
            if model_id in self._slots:
                self._remove(model_id)

    def release_adapter(self, model_id: str) -> None:
        """Queue the adapter's removal from the pipeline; safe from any thread (and from a
        finalizer): the removal happens under the lock at the next call."""
        self._released.append(model_id)

    def _remove(self, model_id: str) -> None:
        slot = self._slots.pop(model_id)
        self.pipeline.delete_adapters(slot.name)

    def _drain_releases(self, keep: str) -> None:
        while self._released:
            model_id = self._released.popleft()
            if model_id != keep and model_id in self._slots:
                self._remove(model_id)

    def _ensure_loaded(self, weights: AdapterWeights, spec: AdapterSpec) -> None:
        if weights.model_id != spec.model_id:
            raise ValueError(f"weights of {weights.model_id} given for {spec.model_id}")
        if spec.model_id in self._slots:
            self._slots.move_to_end(spec.model_id)
            return
        if len(self._slots) >= self.max_adapters:
            victim_id, victim = next(iter(self._slots.items()))
            if victim.signature == weights.signature:
                del self._slots[victim_id]
                try:
                    self._inject(weights, victim.name, hotswap=True)
                except Exception:  # noqa: BLE001 - the slot may be half-written: drop it
                    self._forget_partial(victim.name)
                else:
                    self._slots[spec.model_id] = victim
                    self.hotswaps += 1
                    return
        name = f"slot{next(self._names)}"
        try:
            self._inject(weights, name, hotswap=False)
        except Exception as e:  # noqa: BLE001 - diffusers/peft raise many kinds for a misfit
            self._forget_partial(name)
            raise adapter_incompatible(spec, f"{type(e).__name__}: {e}") from None
        if name not in self._pipeline_adapters():
            raise adapter_incompatible(spec, "no layer of the base model matches its keys")
        self._slots[spec.model_id] = _Slot(name, weights.signature)
        # Only now, so that a misfit evicts nothing: briefly one adapter over the limit.
        while len(self._slots) > self.max_adapters:
            self._remove(next(iter(self._slots)))

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

    def _pipeline_adapters(self) -> set[str]:
        found: set[str] = set()
        for names in self.pipeline.get_list_adapters().values():
            found.update(names)
        return found

    def _forget_partial(self, name: str) -> None:
        """Remove whatever a failed load left behind under `name`."""
        if name in self._pipeline_adapters():
            self.pipeline.delete_adapters(name)

    # --- rendering -----------------------------------------------------------------------------

    def generate(
        self, job: RenderJob, weights: AdapterWeights | None = None
    ) -> list[RenderedImage]:
        """Render every image of the job. Each image is rendered on its own from its own seed,
        so its pixels depend only on (prompt, parameters, seed, adapter and scale), never on
        `n`, batch-mates, or which adapters the pipeline held before.

        A job with an adapter needs its `weights` (loaded here if they are not in the pipeline)."""
        import torch

        spec = job.adapter
        if spec is not None and weights is None:
            raise ValueError(f"job names adapter {spec.model_id} but no weights were given")
        images: list[RenderedImage] = []
        with self._lock:
            self._drain_releases(keep=spec.model_id if spec else "")
            if spec is not None:
                self._ensure_loaded(weights, spec)
                self.pipeline.enable_lora()
                self.pipeline.set_adapters([self._slots[spec.model_id].name], [spec.scale])
            elif self._slots:
                self.pipeline.disable_lora()
            with torch.inference_mode():
                for seed in job.seeds:
                    images.append(self._render_one(job, seed))
        return images

    def _render_one(self, job: RenderJob, seed: int) -> RenderedImage:
        import torch

        # A CPU generator gives the same initial noise on every device.
        generator = torch.Generator("cpu").manual_seed(seed)
        out = self.pipeline(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            width=job.width,
            height=job.height,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance_scale,
            generator=generator,
            output_type="pil",
        )
        spec = job.adapter
        meta = {
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt,
            "seed": seed,
            "steps": job.steps,
            "guidance_scale": job.guidance_scale,
            "width": job.width,
            "height": job.height,
            "base_model": self.model.id,
            "base_model_revision": self.model.revision,
            "adapter": f"{spec.brand}:{spec.version}" if spec else None,
            "adapter_scale": spec.scale if spec else None,
        }
        return RenderedImage(png=encode_png(out.images[0], meta), seed=seed)
