"""A training checkpoint as two objects that cannot run code when read: tensors in safetensors,
everything else in JSON.

`train_lora` hands its state to `on_checkpoint` as a dict: the LoRA weights, the optimizer's
`state_dict()`, the batch generator's state, the step, the losses, and the global RNG states
(`capture_rng`). `encode` splits it into a safetensors file (every tensor, RNG states as uint8
tensors) and a JSON document (optimizer param_groups and non-tensor state, step, losses, the
Python and NumPy RNG states); `decode` rebuilds the same dict, bit for bit. Nothing here unpickles.
torch and NumPy are imported by the functions that need them: the ingress lists checkpoints
(`TENSORS_SUFFIX`, `META_SUFFIX`) without importing torch.
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FORMAT = "brandfarm-checkpoint/1"
TENSORS_SUFFIX = ".safetensors"
META_SUFFIX = ".json"


def capture_rng() -> dict[str, Any]:
    """The process-wide RNG states (Python, NumPy, torch CPU) `seed_everything` seeded."""
    import numpy as np
    import torch

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def restore_rng(rng: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])


def _tensor(value: torch.Tensor) -> torch.Tensor:
    # safetensors wants contiguous tensors that share no storage; checkpoints are small.
    return value.detach().cpu().contiguous().clone()


def encode(state: dict[str, Any]) -> tuple[bytes, bytes]:
    """(safetensors bytes, JSON bytes) of a `train_lora` checkpoint state."""
    import torch
    from safetensors.torch import save as save_tensors

    tensors: dict[str, torch.Tensor] = {f"lora/{k}": _tensor(v) for k, v in state["lora"].items()}
    tensors["rng/generator"] = _tensor(state["generator"])
    optimizer = state["optimizer"]
    other_state: dict[str, dict[str, Any]] = {}
    for index, values in optimizer["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = _tensor(value)
            else:
                other_state.setdefault(str(index), {})[key] = value
    meta: dict[str, Any] = {
        "format": FORMAT,
        "step": int(state["step"]),
        "losses": [float(x) for x in state["losses"]],
        "lora_keys": list(state["lora"]),
        "optimizer": {
            "param_groups": optimizer["param_groups"],
            "state_indices": [int(i) for i in optimizer["state"]],
            "other_state": other_state,
        },
    }
    rng = state.get("rng")
    if rng is not None:
        tensors["rng/torch"] = _tensor(rng["torch"])
        version, internal, gauss = rng["python"]
        name, keys, pos, has_gauss, cached = rng["numpy"]
        meta["rng"] = {
            "python": [version, list(internal), gauss],
            "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        }
    # allow_nan=False: a NaN loss must fail here, loudly, not write what JSON cannot read back.
    return save_tensors(tensors), json.dumps(meta, allow_nan=False).encode()


def decode(tensor_bytes: bytes, meta_bytes: bytes) -> dict[str, Any]:
    """The state `encode` was given, from its two parts (safetensors and JSON only)."""
    import numpy as np
    from safetensors.torch import load as load_tensors

    meta = json.loads(meta_bytes)
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} checkpoint: format {meta.get('format')!r}")
    tensors = load_tensors(tensor_bytes)
    opt = meta["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for index in opt["state_indices"]:
        prefix = f"optimizer/{index}/"
        values = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        values.update(opt["other_state"].get(str(index), {}))
        state[index] = values
    groups = [
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
        for g in opt["param_groups"]
    ]
    out: dict[str, Any] = {
        "step": meta["step"],
        "lora": {k: tensors[f"lora/{k}"] for k in meta["lora_keys"]},
        "optimizer": {"state": state, "param_groups": groups},
        "generator": tensors["rng/generator"],
        "losses": meta["losses"],
    }
    if "rng" in meta:
        version, internal, gauss = meta["rng"]["python"]
        name, keys, pos, has_gauss, cached = meta["rng"]["numpy"]
        out["rng"] = {
            "python": (version, tuple(internal), gauss),
            "numpy": (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached),
            "torch": tensors["rng/torch"],
        }
    return out
