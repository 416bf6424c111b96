"""Brand adapters on a replica, below the pipeline: fetch, verify, parse, and a host-RAM tier.

Three tiers, fastest first:

1. **pipeline**: adapters loaded into the diffusers pipeline (`DiffusionEngine`); switching
   between them is a `set_adapters` call. Ray Serve's multiplexing bounds how many a replica
   keeps (`max_adapters_per_replica`).
2. **host**: parsed state dicts in host RAM (`HostAdapterCache`, LRU by bytes,
   `adapter_host_cache_mb`). Loading from here into the pipeline reads no storage.
3. **store**: the weights file in the object store, fetched by `AdapterFetcher` and checked
   against the sha256 the registry holds for that version before it is parsed.

Plain Python (no Ray, no MLflow at import): the engine, its tests and the GPU box use it as is.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from serve.errors import APIError
from serve.protocol import AdapterSpec
from serve.request_context import request_logger

log = request_logger(__name__)

MLFLOW_ARTIFACTS = "mlflow-artifacts"


class AdapterLoadError(Exception):
    """An adapter could not be used for this render. Carries the HTTP answer; positional
    arguments only, so that it pickles across Ray unchanged."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, message)

    @property
    def status(self) -> int:
        return self.args[0]

    @property
    def code(self) -> str:
        return self.args[1]

    @property
    def message(self) -> str:
        return self.args[2]

    def __str__(self) -> str:
        return self.message

    def as_api_error(self) -> APIError:
        """The API's answer for this failure (a 503 carries `Retry-After`)."""
        headers = {"Retry-After": "2"} if self.status == 503 else None
        return APIError(self.status, self.message, param="adapter", code=self.code, headers=headers)


def _adapter_error(
    status: int, code: str, spec: AdapterSpec, what: str, then: str, detail: str
) -> AdapterLoadError:
    # The detail (a storage endpoint, an object key, a library's exception) goes to this
    # process's log only: the tenant's message says what failed and what to do.
    log.warning("adapter %s: %s: %s", spec.model_id, code, detail)
    return AdapterLoadError(
        status, code, f"adapter {spec.brand!r} version {spec.version} {what}; {then}"
    )


def adapter_corrupt(spec: AdapterSpec, detail: str, shown: str | None = None) -> AdapterLoadError:
    """`shown`: a part of the detail that is safe and useful to the tenant (e.g. checksums)."""
    return _adapter_error(
        500,
        "adapter_corrupt",
        spec,
        f"failed its integrity check ({shown})" if shown else "failed its integrity check",
        "it was not used. Register the adapter again (re-run its fine-tune job).",
        detail,
    )


def adapter_incompatible(
    spec: AdapterSpec, detail: str, shown: str | None = None
) -> AdapterLoadError:
    return _adapter_error(
        500,
        "adapter_incompatible",
        spec,
        f"does not fit this farm's base model ({shown})"
        if shown
        else "does not fit this farm's base model",
        "it was not used. Fine-tune it again on the served base model.",
        detail,
    )


def adapter_unreachable(spec: AdapterSpec, detail: str) -> AdapterLoadError:
    return _adapter_error(
        503,
        "storage_unavailable",
        spec,
        "could not be fetched from storage",
        "retry shortly",
        detail,
    )


@dataclass(eq=False)
class AdapterWeights:
    """One adapter version's parsed LoRA state dict (tensors on CPU), the LoRA config stored in
    the file's metadata (diffusers' `lora_adapter_metadata`: rank, alpha, target modules), and
    its size."""

    model_id: str
    sha256: str
    state_dict: dict[str, Any] = field(repr=False)
    nbytes: int
    metadata: dict[str, Any] | None = None

    @cached_property
    def signature(self) -> tuple:
        """Equal for two adapters with the same tensor names, shapes, dtypes and config: one
        can then replace the other in place in the pipeline."""
        tensors = tuple(
            sorted((k, tuple(t.shape), str(t.dtype)) for k, t in self.state_dict.items())
        )
        return tensors, json.dumps(self.metadata, sort_keys=True)


LORA_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights puts the config


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (an 8-byte header length, then a JSON header)."""
    if len(data) < 8:
        raise ValueError("too short for a safetensors file")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("the header length runs past the end of the file")
    header = json.loads(data[8 : 8 + size])
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return dict(header.get("__metadata__") or {})


def parse_weights(spec: AdapterSpec, data: bytes) -> AdapterWeights:
    """Check `data` against the spec's sha256, then parse it as safetensors."""
    got = hashlib.sha256(data).hexdigest()
    if got != spec.sha256:
        mismatch = f"sha256 is {got}, the registry says {spec.sha256}"
        raise adapter_corrupt(spec, mismatch, shown=mismatch)
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        state_dict = load(data)
        raw = safetensors_metadata(data).get(LORA_METADATA_KEY)
        metadata = json.loads(raw) if raw else None
    except (SafetensorError, ValueError) as e:
        raise adapter_corrupt(
            spec, f"not a safetensors file: {e}", shown="not a safetensors file"
        ) from None
    if not state_dict:
        raise adapter_incompatible(spec, "no tensors", shown="the file holds no tensors")
    nbytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    return AdapterWeights(spec.model_id, spec.sha256, state_dict, nbytes, metadata)


class HostAdapterCache:
    """Parsed adapters in host RAM, least recently used evicted first to stay within
    `budget_bytes`. An adapter bigger than the whole budget is used but not kept. Thread-safe."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 1:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, model_id: str, sha256: str) -> AdapterWeights | None:
        """The cached weights of `model_id` if their sha256 is `sha256`, else None."""
        with self._lock:
            weights = self._items.get(model_id)
            if weights is None or weights.sha256 != sha256:
                return None
            self._items.move_to_end(model_id)
            return weights

    def put(self, weights: AdapterWeights) -> list[str]:
        """Keep `weights`; returns the model ids evicted to make room."""
        with self._lock:
            evicted = []
            old = self._items.pop(weights.model_id, None)
            if old is not None:
                self._bytes -= old.nbytes
            if weights.nbytes > self.budget_bytes:
                return evicted
            while self._items and self._bytes + weights.nbytes > self.budget_bytes:
                model_id, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes
                evicted.append(model_id)
            self._items[weights.model_id] = weights
            self._bytes += weights.nbytes
            return evicted

    def discard(self, model_id: str) -> None:
        with self._lock:
            old = self._items.pop(model_id, None)
            if old is not None:
                self._bytes -= old.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def model_ids(self) -> list[str]:
        """Cached ids, least recently used first."""
        with self._lock:
            return list(self._items)


class AdapterFetcher:
    """Reads an adapter version's weights file from the object store.

    MLflow's proxied artifacts (`mlflow-artifacts:/<path>`) live at `<path>` in the artifacts
    bucket (`mlflow server --artifacts-destination s3://<bucket>`), and `s3://<bucket>/<key>`
    URIs name their object directly: both are read straight from the store, not through the
    tracking server. Anything else, or an object not found where expected, is downloaded through
    MLflow (`download_via_mlflow`, given the URI and a folder), when one is configured.
    """

    def __init__(
        self,
        store: Any,  # registry.storage.ObjectStore on the artifacts bucket
        download_via_mlflow: Callable[[str, Path], Path] | None = None,
    ) -> None:
        self.store = store
        self.download_via_mlflow = download_via_mlflow

    def object_key(self, uri: str) -> str | None:
        """The key of `uri` in the store's bucket, or None if the URI points elsewhere."""
        parts = urlsplit(uri)
        if parts.scheme == MLFLOW_ARTIFACTS:
            return parts.path.lstrip("/") or None
        if parts.scheme == "s3" and parts.netloc == self.store.bucket:
            return parts.path.lstrip("/") or None
        return None

    def fetch(self, spec: AdapterSpec) -> bytes:
        """The weights bytes (not yet verified: `parse_weights` checks them)."""
        from registry.storage import ObjectNotFound, StorageError

        key = self.object_key(spec.weights_uri)
        if key is not None:
            try:
                return self.store.get_bytes(key)
            except ObjectNotFound:
                if self.download_via_mlflow is None:
                    raise adapter_corrupt(
                        spec, f"no object at {spec.weights_uri}", shown="its weights are missing"
                    ) from None
            except StorageError as e:
                raise adapter_unreachable(spec, str(e)) from None
        if self.download_via_mlflow is None:
            raise adapter_unreachable(spec, f"cannot read {spec.weights_uri}: no MLflow client")
        with tempfile.TemporaryDirectory(prefix="brandfarm-adapter-") as tmp:
            try:
                path = self.download_via_mlflow(spec.weights_uri, Path(tmp))
            except Exception as e:  # noqa: BLE001 - the registry's errors, whatever they are
                raise adapter_unreachable(spec, f"{type(e).__name__}: {e}") from None
            return Path(path).read_bytes()
