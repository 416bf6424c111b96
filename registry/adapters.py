"""The MLflow adapter registry: every tenant brand's LoRA versions, aliases and lineage tags.

A brand adapter is the registered model ``<tenant>.<brand>``; each fine-tune that succeeds adds a
version carrying lineage tags (``LINEAGE_TAGS`` plus ``tenant``, ``brand`` and the weights'
``sha256``) and takes the alias ``staging``. Promotion and rollback both move an alias; a
canary (`registry.canary`) is the alias ``challenger`` plus the model's share tag. Every method
takes the tenant and only ever builds ``<tenant>.*`` names, so one tenant can neither see nor
touch another's adapters: a foreign brand is simply "not found", with the same message.

Logging uses ``mlflow.diffusers.log_model`` (the MLflow flavor for diffusers LoRA adapters), not
the ``log_artifacts`` + ``create_model_version`` fallback, so each version is a real MLflow Model
(``MLmodel``, pyfunc, environment) linked to its run. Three details make it safe here:

- The flavor asks the Hugging Face hub for a commit hash whenever ``base_model`` is not an
  absolute path (catalog ids like ``tiny-sd-random`` included); there is no switch for that, so
  the flavor gets the base model's absolute local folder (never a hub call) and the catalog id
  and content hash travel as the ``base_model`` / ``base_model_revision`` tags.
- ``registered_model_name`` is NOT passed: it would register before we could check the upload.
  We log, download the stored weights back, compare sha256, and only then create the version.
- The logged model is created in the run's own experiment (the flavor would otherwise file it
  under the default experiment), and the flavor's fluent code runs against this registry's
  tracking URI.

torch/diffusers are imported by the flavor only while registering, never at import time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import mlflow.artifacts
import mlflow.diffusers
import requests
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from registry.adapter_refs import (  # noqa: F401 - re-exported
    _NAME,
    PRODUCTION,
    AdapterRef,
    check_alias,
    check_name,
    check_version,
)
from registry.canary import CHALLENGER, SHARE_TAG, STARTED_TAG, Canary

T = TypeVar("T")

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
#: Where the flavor puts the adapter folder inside the logged model's artifacts.
_FLAVOR_WEIGHTS = f"adapter_weights/{WEIGHTS_NAME}"
_LOGGED_MODEL_NAME = "adapter"
#: Written by `finetune.train.train_lora` next to the weights; holds the base model's folder.
_TRAINING_SUMMARY = "lora_training.json"

STAGING = "staging"  # the alias every new version takes
#: Tags the caller of `register` must supply (values are stored as strings).
LINEAGE_TAGS = (
    "base_model",
    "base_model_revision",
    "dataset_sha256",
    "job_id",
    "trigger_word",
    "rank",
    "alpha",
    "steps",
)
#: Tags the registry sets itself.
TENANT_TAG, BRAND_TAG, SHA256_TAG = "tenant", "brand", "sha256"
#: Set (to the UTC time, ISO 8601) when a version is archived: hidden from listings and refused
#: by resolution; its weights stay until `registry.adapter_retention` deletes them and sets
#: ``weights_deleted_at``.
ARCHIVED_TAG, WEIGHTS_DELETED_TAG = "archived_at", "weights_deleted_at"

_MISSING = "RESOURCE_DOES_NOT_EXIST"
_EXISTS = "RESOURCE_ALREADY_EXISTS"


class RegistryError(RuntimeError):
    """MLflow refused a registry call or could not be reached."""


class AdapterNotFound(LookupError):
    """No such brand, version or alias for this tenant (another tenant's brand reads the same)."""


class AdapterCorrupt(RegistryError):
    """Stored adapter weights do not match their sha256: a half or altered upload."""


class AdapterInUse(RuntimeError):
    """The version cannot be archived: aliases (``aliases``) point at it."""

    def __init__(self, message: str, aliases: tuple[str, ...]) -> None:
        super().__init__(message)
        self.aliases = aliases


class AdapterArchived(RuntimeError):
    """The version is archived: no alias may point at it."""


class CanaryConflict(RuntimeError):
    """The brand's state does not allow the canary (no champion, or the challenger is it)."""


class CanaryNotFound(LookupError):
    """The brand runs no canary."""


def registered_model_name(tenant: str, brand: str) -> str:
    """The MLflow registered-model name of a tenant's brand: ``<tenant>.<brand>``."""
    return f"{check_name('tenant', tenant)}.{check_name('brand', brand)}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class AdapterVersion:
    """One registered version of a tenant's brand adapter, as MLflow holds it."""

    tenant: str
    brand: str
    version: int
    aliases: tuple[str, ...]
    tags: dict[str, str] = field(hash=False)
    metrics: dict[str, float] = field(hash=False)  # latest values of the version's run
    run_id: str
    source: str  # the model version's source URI (`models:/<logged model id>`)
    sha256: str  # of the weights file, from the `sha256` tag
    created_at: dt.datetime

    @property
    def name(self) -> str:
        return registered_model_name(self.tenant, self.brand)

    @property
    def archived_at(self) -> dt.datetime | None:
        """When the version was archived (UTC); a hand-set tag that is not ISO 8601 counts as
        archived at the version's creation."""
        stamp = self.tags.get(ARCHIVED_TAG)
        if not stamp:
            return None
        try:
            when = dt.datetime.fromisoformat(stamp)
        except ValueError:
            return self.created_at
        return when if when.tzinfo else when.replace(tzinfo=dt.UTC)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        d["created_at"] = self.created_at.isoformat()
        return d


class AdapterRegistry:
    """Tenant-scoped access to the MLflow model registry at ``tracking_uri``."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # --- reading ---------------------------------------------------------------------------

    def brands(self, tenant: str) -> list[str]:
        """The tenant's brands that have a registered model, sorted."""
        prefix = f"{check_name('tenant', tenant)}."
        # LIKE may ignore case (MySQL collations) and keeps non-brand names: compare exactly after.
        found = self._search(self.client.search_registered_models, f"name LIKE '{prefix}%'")
        return sorted(
            m.name[len(prefix) :]
            for m in found
            if m.name.startswith(prefix) and _NAME.match(m.name[len(prefix) :])
        )

    def versions(
        self, tenant: str, brand: str, include_archived: bool = False
    ) -> list[AdapterVersion]:
        """The brand's versions (archived ones only if asked), newest first, with aliases and
        their runs' metrics."""
        name = registered_model_name(tenant, brand)
        aliases = self._aliases(tenant, brand)
        found = self._search(self.client.search_model_versions, f"name = '{name}'")
        metrics: dict[str, dict[str, float]] = {}
        out = []
        for mv in sorted(found, key=lambda mv: int(mv.version), reverse=True):
            if not include_archived and (mv.tags or {}).get(ARCHIVED_TAG):
                continue
            if mv.run_id and mv.run_id not in metrics:
                metrics[mv.run_id] = self._run_metrics(mv.run_id)
            out.append(self._version(tenant, brand, mv, aliases, metrics.get(mv.run_id, {})))
        return out

    def get(self, tenant: str, brand: str, version: int) -> AdapterVersion:
        """One version; `AdapterNotFound` if the brand or the version does not exist."""
        name = registered_model_name(tenant, brand)
        check_version(version)
        aliases = self._aliases(tenant, brand)
        mv = self._mlflow(
            f"get {name} v{version}",
            self.client.get_model_version,
            name,
            str(version),
            missing=AdapterNotFound(f"adapter {brand!r} has no version {version}"),
        )
        return self._version(tenant, brand, mv, aliases, self._run_metrics(mv.run_id))

    def resolve(self, tenant: str, ref: AdapterRef) -> AdapterVersion:
        """The concrete version an alias or version reference names for this tenant."""
        if ref.version is not None:
            found = self.get(tenant, ref.brand, ref.version)
            if found.archived_at is not None:
                raise AdapterNotFound(
                    f"adapter {ref.brand!r} version {ref.version} is archived; use another version"
                )
            return found
        aliases = self._aliases(tenant, ref.brand)
        for version, names in aliases.items():
            if ref.alias in names:
                return self.get(tenant, ref.brand, version)
        raise AdapterNotFound(
            f"adapter {ref.brand!r} has no alias {ref.alias!r}; point it at a version first"
        )

    # --- writing ---------------------------------------------------------------------------

    def set_alias(self, tenant: str, brand: str, alias: str, version: int) -> AdapterVersion:
        """Point ``alias`` at ``version`` (promotion and rollback alike); returns that version."""
        name = registered_model_name(tenant, brand)
        check_alias(alias)
        # AdapterNotFound for a missing brand or version.
        self._refuse_archived(self.get(tenant, brand, version), alias)
        before = self._aliases(tenant, brand)
        previous = next((v for v, names in before.items() if alias in names), None)
        self._set_alias(name, alias, version)
        found = self.get(tenant, brand, version)
        if found.archived_at is not None:
            # Archived between the check and the move: put the alias back where it was.
            if previous is None:
                self._mlflow(
                    f"delete alias {alias} of {name}",
                    self.client.delete_registered_model_alias,
                    name,
                    alias,
                )
            else:
                self._set_alias(name, alias, previous)
            self._refuse_archived(found, alias)
        return found

    def archive(self, tenant: str, brand: str, version: int) -> AdapterVersion:
        """Archive a version: tag it ``archived_at``, which hides it from `versions` and makes
        `resolve` refuse it. `AdapterInUse` (naming the aliases) while an alias points at it;
        archiving an archived version changes nothing. The weights stay in the store."""
        name = registered_model_name(tenant, brand)
        found = self.get(tenant, brand, version)
        if found.archived_at is not None:
            return found
        self._refuse_in_use(found)
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._tag(name, version, ARCHIVED_TAG, stamp)
        after = self.get(tenant, brand, version)
        if after.aliases:
            # An alias moved here meanwhile: the version stays in use, and unarchived.
            self._mlflow(
                f"untag {name} v{version}",
                self.client.delete_model_version_tag,
                name,
                str(version),
                ARCHIVED_TAG,
            )
            self._refuse_in_use(after)
        return after

    def delete_weights(self, version: AdapterVersion) -> None:
        """Delete an archived version's logged model artifacts (the weights and MLmodel) from
        the artifact store through the tracking server, then tag it ``weights_deleted_at``."""
        if version.archived_at is None:
            raise ValueError(f"{version.name} v{version.version} is not archived")
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        label = f"{version.name} v{version.version}"
        uri = self._mlflow(
            f"locate {label}",
            self.client.get_model_version_download_uri,
            version.name,
            str(version.version),
        )
        try:
            get_artifact_repository(uri, tracking_uri=self.tracking_uri).delete_artifacts()
        except (MlflowException, OSError, requests.RequestException) as e:
            raise RegistryError(
                f"MLflow at {self.tracking_uri}: deleting the artifacts of {label} failed: {e}"
            ) from e
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._tag(version.name, version.version, WEIGHTS_DELETED_TAG, stamp)

    def brand_tags(self, tenant: str, brand: str) -> dict[str, str]:
        """The tags of the brand's registered model (its promotion policy lives there);
        `AdapterNotFound` for a missing or foreign brand."""
        name = registered_model_name(tenant, brand)
        model = self._mlflow(
            f"get {name}",
            self.client.get_registered_model,
            name,
            missing=AdapterNotFound(f"no adapter {brand!r} for this tenant"),
        )
        return dict(model.tags or {})

    def set_brand_tags(self, tenant: str, brand: str, tags: dict[str, str]) -> None:
        name = registered_model_name(tenant, brand)
        self.brand_tags(tenant, brand)  # AdapterNotFound before writing anything
        for key, value in tags.items():
            self._mlflow(f"tag {name}", self.client.set_registered_model_tag, name, key, str(value))

    def set_version_tags(self, tenant: str, brand: str, version: int, tags: dict[str, str]) -> None:
        name = registered_model_name(tenant, brand)
        check_version(version)
        for key, value in tags.items():
            self._tag(name, version, key, str(value))

    def append_run_note(self, run_id: str, text: str) -> None:
        """Add a paragraph to the run's note (MLflow's ``mlflow.note.content`` tag)."""
        run = self._mlflow(f"get run {run_id}", self.client.get_run, run_id)
        before = run.data.tags.get("mlflow.note.content", "")
        note = f"{before}\n\n{text}" if before else text
        self._mlflow(f"note run {run_id}", self.client.set_tag, run_id, "mlflow.note.content", note)

    def _set_alias(self, name: str, alias: str, version: int) -> None:
        self._mlflow(
            f"set alias {alias} of {name}",
            self.client.set_registered_model_alias,
            name,
            alias,
            str(version),
        )

    def _tag(self, name: str, version: int, key: str, value: str) -> None:
        self._mlflow(
            f"tag {name} v{version}",
            self.client.set_model_version_tag,
            name,
            str(version),
            key,
            value,
        )

    @staticmethod
    def _refuse_archived(version: AdapterVersion, alias: str) -> None:
        if version.archived_at is not None:
            raise AdapterArchived(
                f"adapter {version.brand!r} version {version.version} is archived; alias "
                f"{alias!r} cannot point at it"
            )

    @staticmethod
    def _refuse_in_use(version: AdapterVersion) -> None:
        if version.aliases:
            names = ", ".join(version.aliases)
            raise AdapterInUse(
                f"adapter {version.brand!r} version {version.version} is in use by the alias"
                f"{'es' if len(version.aliases) > 1 else ''} {names}; point "
                f"{'them' if len(version.aliases) > 1 else 'it'} at another version first",
                version.aliases,
            )

    def register(
        self,
        tenant: str,
        brand: str,
        adapter_dir: str | Path,
        *,
        run_id: str,
        tags: dict[str, Any],
        base_model_path: str | Path | None = None,
    ) -> AdapterVersion:
        """Log ``adapter_dir`` in run ``run_id``, verify the stored weights, then register them
        as a new version of ``<tenant>.<brand>`` with lineage ``tags`` and alias ``staging``.

        ``base_model_path`` is the local base-model folder the adapter was trained on; by default
        it is read from the folder's ``lora_training.json`` (``base_model``). If the stored
        weights differ from the local file, `AdapterCorrupt` is raised and nothing is registered.
        """
        name = registered_model_name(tenant, brand)
        adapter_dir = Path(adapter_dir)
        weights = adapter_dir / WEIGHTS_NAME
        if not weights.is_file():
            raise ValueError(f"adapter_dir {adapter_dir} holds no {WEIGHTS_NAME}")
        base_folder = _base_model_folder(adapter_dir, base_model_path)
        sha256 = sha256_file(weights)
        version_tags = _version_tags(tenant, brand, sha256, tags)
        run = self._run(run_id)

        logged = self._log_adapter(run, adapter_dir, base_folder, tenant, brand)
        try:
            self._verify_stored(logged, sha256)
        except Exception:
            self._forget(logged)
            raise

        self._ensure_registered_model(name, tenant, brand)
        mv = self._mlflow(
            f"create a version of {name}",
            self.client.create_model_version,
            name,
            f"models:/{logged.model_id}",
            run_id=run.info.run_id,
            tags=version_tags,
            model_id=logged.model_id,
            description=f"LoRA adapter of job {version_tags['job_id']}",
        )
        self._set_alias(name, STAGING, int(mv.version))
        return self.get(tenant, brand, int(mv.version))

    # --- canary (registry.canary) ----------------------------------------------------------

    def canary(self, tenant: str, brand: str) -> Canary | None:
        """The brand's running canary, or None; `AdapterNotFound` if no such brand."""
        model = self._model(tenant, brand)
        return Canary.from_model(dict(model.aliases or {}), dict(model.tags or {}))

    def start_canary(self, tenant: str, brand: str, version: int, share: float) -> Canary:
        """Make ``version`` the challenger of ``production`` with ``share`` (0..1) of the
        renders that name the brand's production alias; on a running canary this changes the
        challenger, the share or both. `AdapterNotFound` for a missing brand or version,
        `AdapterArchived` for an archived one, `CanaryConflict` without a production version or
        when ``version`` is the production version."""
        name = registered_model_name(tenant, brand)
        Canary(check_version(version), share)  # ValueError for a bad share
        # Check everything before writing, so a refused change leaves a running canary as is.
        self._refuse_archived(self.get(tenant, brand, version), CHALLENGER)
        model = self._model(tenant, brand)
        champion = (model.aliases or {}).get(PRODUCTION)
        if champion is None:
            raise CanaryConflict(
                f"adapter {brand!r} has no production version to run a canary against; "
                "promote a version first"
            )
        if int(champion) == version:
            raise CanaryConflict(
                f"adapter {brand!r} version {version} is already production; choose another "
                "version as the challenger"
            )
        running = Canary.from_model(dict(model.aliases or {}), dict(model.tags or {}))
        started = running.started_at if running and running.challenger == version else None
        # The share first: a new challenger alias then starts at the share asked for.
        self._model_tag(name, SHARE_TAG, repr(float(share)))
        if started is None:
            started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            self._model_tag(name, STARTED_TAG, started)
        self.set_alias(tenant, brand, CHALLENGER, version)
        return Canary(version, float(share), started, int(champion))

    def end_canary(self, tenant: str, brand: str) -> Canary:
        """Remove the challenger (alias first, so renders stop using it at once) and the
        canary's tags; returns the canary that ran. `CanaryNotFound` if none runs. Promoting
        the challenger is `set_alias(production)` followed by this."""
        name = registered_model_name(tenant, brand)
        model = self._model(tenant, brand)
        tags = dict(model.tags or {})
        running = Canary.from_model(dict(model.aliases or {}), tags)
        if running is None:
            raise CanaryNotFound(f"adapter {brand!r} has no canary running")
        self._mlflow(
            f"delete alias {CHALLENGER} of {name}",
            self.client.delete_registered_model_alias,
            name,
            CHALLENGER,
        )
        for key in (SHARE_TAG, STARTED_TAG):
            if key in tags:
                self._mlflow(f"untag {name}", self.client.delete_registered_model_tag, name, key)
        return running

    def _model_tag(self, name: str, key: str, value: str) -> None:
        self._mlflow(f"tag {name}", self.client.set_registered_model_tag, name, key, value)

    # --- the weights file ------------------------------------------------------------------

    def download(self, version: AdapterVersion, dst_dir: str | Path) -> Path:
        """Fetch the version's weights to ``dst_dir/pytorch_lora_weights.safetensors``, checked
        against the registry's sha256 tag (`AdapterCorrupt` if they differ, and nothing is left
        at the destination). The version is re-read from the registry under its own tenant."""
        current = self.get(version.tenant, version.brand, version.version)
        label = f"{current.name} v{current.version}"
        if current.tags.get(WEIGHTS_DELETED_TAG):
            raise AdapterNotFound(
                f"adapter {current.brand!r} version {current.version} was archived and its "
                "weights deleted"
            )
        if not current.sha256:
            raise AdapterCorrupt(f"{label} has no sha256 tag; register it again")
        if current.sha256 != version.sha256:
            raise AdapterCorrupt(
                f"{label}: the registry's sha256 tag is {current.sha256}, not the "
                f"{version.sha256} it had when resolved; refusing to load it"
            )
        uri = self._mlflow(
            f"locate {label}",
            self.client.get_model_version_download_uri,
            current.name,
            str(current.version),
        )
        dst_dir = Path(dst_dir)
        dst_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dst_dir, prefix=".download-") as tmp:
            fetched = self._fetch_weights(uri, Path(tmp))
            got = sha256_file(fetched)
            if got != current.sha256:
                raise AdapterCorrupt(
                    f"{label}: downloaded weights have sha256 {got}, the registry says "
                    f"{current.sha256}; the stored adapter is damaged, register it again"
                )
            target = dst_dir / WEIGHTS_NAME
            fetched.replace(target)
        return target

    def weights_uri(self, version: AdapterVersion) -> str:
        """The artifact URI of the version's weights file (`mlflow-artifacts:/...`, `s3://...`);
        fixed for the life of the version, so callers may cache it."""
        uri = self._mlflow(
            f"locate {version.name} v{version.version}",
            self.client.get_model_version_download_uri,
            version.name,
            str(version.version),
        )
        return f"{uri.rstrip('/')}/{_FLAVOR_WEIGHTS}"

    def fetch_weights_uri(self, uri: str, dst_dir: Path) -> Path:
        """Download one artifact URI (e.g. from `weights_uri`) through the tracking server."""
        return self._mlflow(
            f"download {uri}",
            mlflow.artifacts.download_artifacts,
            artifact_uri=uri,
            dst_path=str(dst_dir),
            tracking_uri=self.tracking_uri,
            registry_uri=self.tracking_uri,
        )

    def _fetch_weights(self, artifacts_uri: str, dst_dir: Path) -> Path:
        """Download the weights file from a logged model's artifact location into ``dst_dir``."""
        path = self._mlflow(
            f"download {artifacts_uri}/{_FLAVOR_WEIGHTS}",
            mlflow.artifacts.download_artifacts,
            artifact_uri=f"{artifacts_uri}/{_FLAVOR_WEIGHTS}",
            dst_path=str(dst_dir),
            tracking_uri=self.tracking_uri,
            registry_uri=self.tracking_uri,
        )
        return Path(path)

    # --- helpers ---------------------------------------------------------------------------

    def _mlflow(
        self,
        what: str,
        fn: Callable[..., T],
        *args: Any,
        missing: Exception | None = None,
        **kwargs: Any,
    ) -> T:
        """Call MLflow; "does not exist" becomes ``missing``, anything else `RegistryError`."""
        try:
            return fn(*args, **kwargs)
        except MlflowException as e:
            if missing is not None and e.error_code == _MISSING:
                raise missing from None
            raise self._error(what, e) from e

    def _error(self, what: str, e: MlflowException) -> RegistryError:
        return RegistryError(f"MLflow at {self.tracking_uri}: {what} failed: {e.message}")

    def _search(self, search: Callable[..., Any], filter_string: str) -> Iterator[Any]:
        token = None
        while True:
            page = self._mlflow(
                f"search {filter_string!r}", search, filter_string=filter_string, page_token=token
            )
            yield from page
            token = page.token
            if not token:
                return

    def _model(self, tenant: str, brand: str) -> Any:
        """The brand's registered model; `AdapterNotFound` (one message for all) if none."""
        name = registered_model_name(tenant, brand)
        return self._mlflow(
            f"get {name}",
            self.client.get_registered_model,
            name,
            missing=AdapterNotFound(f"no adapter {brand!r} for this tenant"),
        )

    def _aliases(self, tenant: str, brand: str) -> dict[int, tuple[str, ...]]:
        """version -> its aliases; `AdapterNotFound` (one message for all) if no such brand."""
        model = self._model(tenant, brand)
        by_version: dict[int, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            by_version.setdefault(int(version), []).append(alias)
        return {v: tuple(sorted(a)) for v, a in by_version.items()}

    def _run(self, run_id: str) -> Run:
        run = self._mlflow(
            f"get run {run_id}",
            self.client.get_run,
            run_id,
            missing=ValueError(f"run_id {run_id!r} is not a run of {self.tracking_uri}"),
        )
        if run.info.status in ("FAILED", "KILLED"):
            raise ValueError(f"run {run_id} is {run.info.status}; a failed job registers nothing")
        return run

    def _run_metrics(self, run_id: str | None) -> dict[str, float]:
        if not run_id:
            return {}
        try:
            return dict(self.client.get_run(run_id).data.metrics)
        except MlflowException as e:
            if e.error_code == _MISSING:  # the run was deleted; the version stands on its own
                return {}
            raise self._error(f"get run {run_id}", e) from e

    @staticmethod
    def _version(
        tenant: str,
        brand: str,
        mv: Any,
        aliases: dict[int, tuple[str, ...]],
        metrics: dict[str, float],
    ) -> AdapterVersion:
        tags = dict(mv.tags or {})
        return AdapterVersion(
            tenant=tenant,
            brand=brand,
            version=int(mv.version),
            aliases=aliases.get(int(mv.version), ()),
            tags=tags,
            metrics=metrics,
            run_id=mv.run_id or "",
            source=mv.source or "",
            sha256=tags.get(SHA256_TAG, ""),
            created_at=dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=dt.UTC),
        )

    def _log_adapter(
        self, run: Run, adapter_dir: Path, base_folder: Path, tenant: str, brand: str
    ) -> LoggedModel:
        """Log the folder with the diffusers flavor as a logged model of the run's experiment."""
        logged = self._mlflow(
            "create a logged model",
            self.client.create_logged_model,
            experiment_id=run.info.experiment_id,
            name=_LOGGED_MODEL_NAME,
            source_run_id=run.info.run_id,
            tags={TENANT_TAG: tenant, BRAND_TAG: brand},
            model_type="lora-adapter",
        )
        try:
            with self._fluent_uri():
                self._mlflow(
                    f"log adapter {adapter_dir}",
                    mlflow.diffusers.log_model,
                    str(adapter_dir),
                    base_model=str(base_folder),  # absolute: the flavor asks no hub
                    name=_LOGGED_MODEL_NAME,
                    run_id=run.info.run_id,
                    model_id=logged.model_id,
                )
        except Exception:
            self._forget(logged)
            raise
        return logged

    @contextmanager
    def _fluent_uri(self) -> Iterator[None]:
        """The flavor's fluent code talks to the global tracking URI: make it ours meanwhile."""
        same = mlflow.get_tracking_uri() == self.tracking_uri
        with nullcontext() if same else _use_tracking_uri(self.tracking_uri):
            yield

    def _verify_stored(self, logged: LoggedModel, sha256: str) -> None:
        with tempfile.TemporaryDirectory(prefix="brandfarm-verify-") as tmp:
            try:
                stored = self._fetch_weights(logged.artifact_location, Path(tmp))
            except RegistryError as e:
                raise AdapterCorrupt(
                    f"could not read back the uploaded adapter ({e}); nothing was registered, "
                    "retry the registration"
                ) from e
            got = sha256_file(stored)
        if got != sha256:
            raise AdapterCorrupt(
                f"the uploaded adapter's weights have sha256 {got}, the local file {sha256}; "
                "nothing was registered, retry the registration"
            )

    def _forget(self, logged: LoggedModel) -> None:
        """Delete an unverified logged model, so that no one registers it by hand later."""
        with suppress(MlflowException):  # best effort: it is unregistered either way
            self.client.delete_logged_model(logged.model_id)

    def _ensure_registered_model(self, name: str, tenant: str, brand: str) -> None:
        try:
            self.client.create_registered_model(
                name,
                tags={TENANT_TAG: tenant, BRAND_TAG: brand},
                description=f"LoRA adapters of brand {brand!r} of tenant {tenant!r}",
            )
        except MlflowException as e:
            if e.error_code != _EXISTS:
                raise self._error(f"create {name}", e) from e


def _version_tags(tenant: str, brand: str, sha256: str, tags: dict[str, Any]) -> dict[str, str]:
    missing = [k for k in LINEAGE_TAGS if k not in tags]
    if missing:
        raise ValueError(f"tags lack the lineage keys {', '.join(missing)}")
    own = {TENANT_TAG: tenant, BRAND_TAG: brand, SHA256_TAG: sha256}
    for key, value in own.items():
        if key in tags and str(tags[key]) != value:
            raise ValueError(f"tags[{key!r}] is set by the registry ({value!r}), not {tags[key]!r}")
    return {**{k: str(v) for k, v in tags.items()}, **own}


def _base_model_folder(adapter_dir: Path, base_model_path: str | Path | None) -> Path:
    """The absolute local base-model folder to record in the flavor (never a hub id)."""
    if base_model_path is None:
        summary = adapter_dir / _TRAINING_SUMMARY
        try:
            base_model_path = json.loads(summary.read_text())["base_model"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"base_model_path not given and {summary} names no base_model ({e}); pass the "
                "local base-model folder the adapter was trained on"
            ) from e
    folder = Path(base_model_path).expanduser().resolve()
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"base_model_path {str(base_model_path)!r} is not a local diffusers folder "
            "(no model_index.json)"
        )
    return folder
