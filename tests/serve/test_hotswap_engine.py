"""Adapters in the engine and its host tier, without Ray: pixel identity across loads, switches
and evictions, exactly-one-adapter under concurrency, misfits leave the pipeline as it was."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.synthetic_lora import random_lora_bytes
from registry.base_models import TINY_RANDOM, ensure_base_model, load_pipeline
from serve.adapter_cache import (
    AdapterFetcher,
    AdapterLoadError,
    AdapterWeights,
    HostAdapterCache,
    parse_weights,
)
from serve.engine import DiffusionEngine
from serve.protocol import AdapterSpec, RenderJob

BUILTIN = "brandfarm-shapes"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ensure_base_model(BUILTIN, tmp_path_factory.mktemp("models"), 1024)


@pytest.fixture(scope="module")
def adapters(model) -> dict[str, tuple[AdapterSpec, bytes]]:
    unet = load_pipeline(model, "cpu").unet
    out = {}
    for i in range(4):
        data = random_lora_bytes(unet, seed=i)
        out[f"b{i}"] = (spec_for(f"b{i}", data), data)
    return out


def spec_for(brand: str, data: bytes, scale: float = 1.0, version: int = 1) -> AdapterSpec:
    sha = hashlib.sha256(data).hexdigest()
    return AdapterSpec("t1", brand, version, scale, sha, f"s3://mlflow/{brand}", brand)


def weights(adapters, brand: str) -> AdapterWeights:
    spec, data = adapters[brand]
    return parse_weights(spec, data)


def job(spec: AdapterSpec | None = None, seed: int = 3, scale: float | None = None) -> RenderJob:
    if spec is not None and scale is not None:
        spec = dataclasses.replace(spec, scale=scale)
    return RenderJob("a red circle on a blue background", None, 32, 32, 6, 4.0, (seed,), spec)


def px(images) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(images[0].png)).convert("RGB"))


def render(engine, adapters, brand: str | None, **kw) -> np.ndarray:
    if brand is None:
        return px(engine.generate(job(**kw)))
    return px(engine.generate(job(adapters[brand][0], **kw), weights(adapters, brand)))


@pytest.fixture(scope="module")
def engine(model):
    return DiffusionEngine.load(model, "cpu", max_adapters=2)


def test_pixels_do_not_depend_on_what_was_loaded_before(model, engine, adapters):
    fresh_engine = DiffusionEngine.load(model, "cpu", max_adapters=2)
    reference = render(fresh_engine, adapters, "b0")
    assert np.array_equal(render(engine, adapters, "b0"), reference)
    render(engine, adapters, "b1")
    assert np.array_equal(render(engine, adapters, "b0"), reference)  # resident, after another
    render(engine, adapters, "b2")
    render(engine, adapters, "b3")  # b0 evicted (2 slots)
    assert not engine.has_adapter("t1/b0:1")
    assert np.array_equal(render(engine, adapters, "b0"), reference)  # loaded again
    assert len(engine.loaded_adapters()) == 2


def test_scale_zero_is_the_base_model_and_scale_matters(engine, adapters):
    base = render(engine, adapters, None)
    assert np.array_equal(render(engine, adapters, "b1", scale=0.0), base)
    full = render(engine, adapters, "b1")
    half = render(engine, adapters, "b1", scale=0.5)
    assert not np.array_equal(full, base) and not np.array_equal(half, full)
    assert np.array_equal(render(engine, adapters, None), base)  # LoRA disabled again


def test_release_is_deferred_until_the_next_call_and_never_drops_the_running_adapter(
    engine, adapters
):
    render(engine, adapters, "b2")
    render(engine, adapters, "b3")
    engine.release_adapter("t1/b2:1")
    engine.release_adapter("t1/b3:1")
    assert engine.has_adapter("t1/b3:1")  # queued only
    render(engine, adapters, "b3")  # drains: b2 removed, b3 (this job's) kept
    assert engine.loaded_adapters() == ["t1/b3:1"]
    assert len(engine.slot_names()) == 1  # and nothing else is left in the pipeline


def test_concurrent_jobs_each_render_with_exactly_their_adapter(model, adapters):
    engine = DiffusionEngine.load(model, "cpu", max_adapters=2)
    brands = [None, "b0", "b1", "b2", "b3"]
    reference = {(b, s): render(engine, adapters, b, seed=s) for b in brands for s in (1, 2)}
    work = [(b, s) for s in (1, 2) for b in brands] * 2
    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda w: render(engine, adapters, w[0], seed=w[1]), work))
    for w, image in zip(work, results, strict=True):
        assert np.array_equal(image, reference[w]), w
    assert len({reference[w].tobytes() for w in reference}) == len(reference)


def test_adapter_for_another_base_model_leaves_the_pipeline_as_it_was(engine, adapters, tmp_path):
    other = ensure_base_model(TINY_RANDOM, tmp_path / "models", 1024)
    data = random_lora_bytes(load_pipeline(other, "cpu").unet, seed=9)
    misfit = spec_for("misfit", data)
    before = render(engine, adapters, "b0")
    loaded, slots = engine.loaded_adapters(), engine.slot_names()
    with pytest.raises(AdapterLoadError) as e:
        engine.generate(job(misfit), parse_weights(misfit, data))
    assert e.value.status == 500 and e.value.code == "adapter_incompatible"
    assert "misfit" in str(e.value)
    assert engine.loaded_adapters() == loaded and engine.slot_names() == slots
    assert np.array_equal(render(engine, adapters, "b0"), before)


def test_in_place_swaps_and_fresh_loads_render_the_same_pixels(model, adapters):
    reference = DiffusionEngine.load(model, "cpu", max_adapters=4)
    expected = {b: render(reference, adapters, b) for b in ("b0", "b1", "b2")}
    assert reference.hotswaps == 0
    one_slot = DiffusionEngine.load(model, "cpu", max_adapters=1)
    for brand in ("b0", "b1", "b2", "b0", "b1"):
        assert np.array_equal(render(one_slot, adapters, brand), expected[brand]), brand
    assert one_slot.hotswaps == 4 and len(one_slot.slot_names()) == 1

    unet = reference.pipeline.unet
    data = random_lora_bytes(unet, seed=11, rank=8)  # another shape: no in-place swap
    wide = spec_for("wide", data)
    adapters = {**adapters, "wide": (wide, data)}
    fresh = render(DiffusionEngine.load(model, "cpu"), adapters, "wide")
    assert np.array_equal(render(one_slot, adapters, "wide"), fresh)
    assert one_slot.hotswaps == 4 and one_slot.loaded_adapters() == [wide.model_id]
    assert np.array_equal(render(one_slot, adapters, "b2"), expected["b2"])


def test_reused_weights_survive_in_place_swaps(model, adapters):
    """The host tier hands the engine the same parsed weights again and again: loading and
    then swapping another adapter into that slot must leave them untouched."""
    import torch

    reference = DiffusionEngine.load(model, "cpu", max_adapters=4)
    cached = {b: weights(adapters, b) for b in ("b0", "b1")}
    originals = {b: {k: t.clone() for k, t in w.state_dict.items()} for b, w in cached.items()}
    expected = {b: render(reference, adapters, b) for b in cached}
    one_slot = DiffusionEngine.load(model, "cpu", max_adapters=1)
    for brand in ("b0", "b1", "b0", "b1"):
        spec = adapters[brand][0]
        image = px(one_slot.generate(job(spec), cached[brand]))
        assert np.array_equal(image, expected[brand]), brand
    assert one_slot.hotswaps == 3
    for brand, weights_ in cached.items():
        assert all(torch.equal(originals[brand][k], t) for k, t in weights_.state_dict.items())


def test_the_files_lora_alpha_is_honoured_as_diffusers_loads_the_file(model, tmp_path):
    from finetune.synthetic_lora import write_random_lora

    engine = DiffusionEngine.load(model, "cpu")
    unet = engine.pipeline.unet
    path = write_random_lora(unet, tmp_path / "a16", seed=5, rank=4, alpha=16)
    data = path.read_bytes()
    spec = spec_for("alpha", data)
    assert parse_weights(spec, data).metadata["unet.lora_alpha"] == 16
    ours = render(engine, {"alpha": (spec, data)}, "alpha")

    direct = DiffusionEngine.load(model, "cpu")  # diffusers reading the file itself
    direct.pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="f")
    direct.pipeline.set_adapters(["f"], [1.0])
    generator = __import__("torch").Generator("cpu").manual_seed(3)
    out = direct.pipeline(
        prompt="a red circle on a blue background",
        width=32,
        height=32,
        num_inference_steps=6,
        guidance_scale=4.0,
        generator=generator,
    ).images[0]
    assert np.array_equal(ours, np.asarray(out.convert("RGB")))
    same_alpha = random_lora_bytes(unet, seed=5, rank=4)  # same weights, alpha = rank
    plain = render(engine, {"p": (spec_for("p", same_alpha), same_alpha)}, "p")
    assert not np.array_equal(plain, ours)


def test_a_job_without_its_weights_is_refused(engine, adapters):
    with pytest.raises(ValueError, match="no weights"):
        engine.generate(job(adapters["b0"][0]))


# --- the host tier and the fetcher --------------------------------------------------------------


def fake_weights(model_id: str, nbytes: int, sha: str = "s") -> AdapterWeights:
    return AdapterWeights(model_id, sha, {}, nbytes)


def test_host_cache_is_lru_by_bytes():
    cache = HostAdapterCache(100)
    assert cache.put(fake_weights("a", 40)) == []
    assert cache.put(fake_weights("b", 40)) == []
    assert cache.get("a", "s") is not None  # a is now the most recent
    assert cache.put(fake_weights("c", 40)) == ["b"]
    assert cache.model_ids() == ["a", "c"] and cache.nbytes == 80
    assert cache.put(fake_weights("huge", 101)) == []  # bigger than the budget: not kept
    assert "huge" not in cache.model_ids()
    assert cache.get("a", "other-sha") is None  # a different version's bytes never match
    cache.discard("a")
    assert cache.model_ids() == ["c"] and cache.nbytes == 40
    with pytest.raises(ValueError):
        HostAdapterCache(0)


def test_parse_weights_checks_the_sha256_first(adapters):
    spec, data = adapters["b0"]
    parsed = parse_weights(spec, data)
    assert parsed.model_id == "t1/b0:1" and parsed.nbytes > 0
    with pytest.raises(AdapterLoadError) as e:
        parse_weights(spec, data[:-1] + b"\0")
    assert e.value.code == "adapter_corrupt" and e.value.status == 500
    junk = b"not a safetensors file"
    with pytest.raises(AdapterLoadError) as e:
        parse_weights(spec_for("b0", junk), junk)
    assert e.value.code == "adapter_corrupt"


def test_adapter_load_error_survives_pickling():
    import pickle

    err = AdapterLoadError(503, "storage_unavailable", "retry")
    back = pickle.loads(pickle.dumps(err))
    assert (back.status, back.code, back.message) == (503, "storage_unavailable", "retry")


class Bucket:
    """A stand-in for `ObjectStore` with the two members the fetcher uses."""

    def __init__(self, objects: dict[str, bytes], bucket: str = "mlflow") -> None:
        self.objects = objects
        self.bucket = bucket

    def get_bytes(self, key: str) -> bytes:
        from registry.storage import ObjectNotFound

        if key not in self.objects:
            raise ObjectNotFound(key)
        return self.objects[key]


def test_fetcher_reads_proxied_artifacts_straight_from_the_bucket(tmp_path: Path):
    store = Bucket({"1/models/m-1/artifacts/w.safetensors": b"weights"})
    fetcher = AdapterFetcher(store)
    spec = dataclasses.replace(
        spec_for("b", b""), weights_uri="mlflow-artifacts:/1/models/m-1/artifacts/w.safetensors"
    )
    assert fetcher.fetch(spec) == b"weights"
    assert fetcher.object_key("s3://mlflow/k/w") == "k/w"
    assert fetcher.object_key("s3://elsewhere/k/w") is None
    assert fetcher.object_key("file:///tmp/w") is None


def test_fetcher_falls_back_to_mlflow_where_the_bucket_has_no_object(tmp_path: Path):
    calls = []

    def via_mlflow(uri: str, folder: Path) -> Path:
        calls.append(uri)
        (folder / "w").write_bytes(b"from mlflow")
        return folder / "w"

    fetcher = AdapterFetcher(Bucket({}), via_mlflow)
    spec = dataclasses.replace(spec_for("b", b""), weights_uri="mlflow-artifacts:/x/w")
    assert fetcher.fetch(spec) == b"from mlflow" and calls == ["mlflow-artifacts:/x/w"]
    without = AdapterFetcher(Bucket({}))
    with pytest.raises(AdapterLoadError) as e:
        without.fetch(spec)
    assert e.value.code == "adapter_corrupt"
