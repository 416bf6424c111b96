"""The embedded local stack: object store, MLflow server, Ray head and the Serve application.

`LocalStack(settings).up()` starts, idempotently, every component not configured as external,
under the state directory; `down()` stops what `up` started (by recorded PIDs) and keeps data.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from pydantic import SecretStr

from cluster.processes import ManagedProcess, ProcessSpec, StackError
from cluster.topology import Topology, alive_nodes, local_worker_resource, read_topology
from registry import alias_webhook
from registry.base_models import BaseModelInfo, ensure_base_model
from registry.secret_box import new_key
from registry.settings import Settings, child_env
from registry.storage import ObjectStore
from serve.serve_config import http_options
from serve.signing import SigningSetupError, load_signing_identity

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    url: str
    managed: bool  # runs in the embedded stack (False: external, configured by URL)
    pid: int | None
    answers: bool


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def database_problem(url: str, timeout_s: int = 5) -> str | None:
    """Why the database at `url` cannot be used, in words that name no credential; None if it
    answers."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    connect_args = {"connect_timeout": timeout_s} if url.startswith("postgresql") else {}
    try:
        engine = create_engine(url, connect_args=connect_args)
    except (ArgumentError, NoSuchModuleError, ValueError):
        return "is not a valid SQLAlchemy URL"
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError:
        return "cannot be reached or refuses the connection"
    finally:
        engine.dispose()
    return None


# A Ray node keeps nothing worth a long grace (the GCS holds no durable state here), and a head
# whose GCS is gone leaves its raylet waiting on TERM for half a minute: KILL after 5 s.
RAY_STOP_TIMEOUT_S = 5.0


def _ray_env() -> dict[str, str]:
    # Explicit, so that a token file left in ~/.ray by another Ray cluster cannot switch
    # the embedded (loopback-only) cluster to token auth and lock our own clients out.
    return child_env({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"})


def _where(spec: ProcessSpec) -> str:
    return f" on port {spec.port}" if spec.port is not None else ""


def _bin(name: str) -> str:
    """An executable of this environment (the venv's `ray`, `rclone`, `mlflow`)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found next to {sys.executable} or on PATH; reinstall")
    return found


class LocalStack:
    def __init__(self, settings: Settings, progress: Progress | None = None) -> None:
        self.settings = settings.model_copy(update={"state_dir": settings.state_path})
        self.state = self.settings.state_dir
        self.progress = progress or (lambda _msg: None)

    # --- credentials ------------------------------------------------------------------------
    @property
    def credentials_file(self) -> Path:
        return self.state / "credentials.json"

    def _stored_credentials(self) -> dict[str, str]:
        if self.credentials_file.exists():
            return json.loads(self.credentials_file.read_text())
        return {}

    def _credential(self, name: str, create: Callable[[], dict[str, str]]) -> dict[str, str]:
        """The credentials file, with `create()`'s values added under a lock if it lacks `name`
        (the CLI and `up` may both create at once: a key made twice would be lost once)."""
        creds = self._stored_credentials()
        if name in creds:
            return creds
        self.state.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.credentials_file) + ".lock", timeout=60):
            creds = self._stored_credentials()
            if name not in creds:
                creds |= create()
                tmp = self.credentials_file.with_name(f".credentials.{os.getpid()}.tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    json.dump(creds, f)
                os.replace(tmp, self.credentials_file)
        return creds

    def _embedded_credentials(self, create: bool) -> dict[str, str] | None:
        creds = self._stored_credentials()
        if "s3_access_key" not in creds:
            if not create:
                return None
            creds = self._credential(
                "s3_access_key",
                lambda: {
                    "s3_access_key": "bf" + secrets.token_hex(8),
                    "s3_secret_key": secrets.token_urlsafe(30),
                },
            )
        return {k: v for k, v in creds.items() if k.startswith("s3_")}

    def encryption_keys(self, create: bool) -> str | None:
        """The farm key of an embedded farm (`encryption_keys`): the setting when it is set,
        else the one in the credentials file, made there on first use when `create`."""
        if self.settings.encryption_keys is not None:
            return self.settings.encryption_keys.get_secret_value()
        if not create:
            return self._stored_credentials().get("encryption_keys")
        return self._credential("encryption_keys", lambda: {"encryption_keys": new_key()})[
            "encryption_keys"
        ]

    @property
    def webhook_keys_file(self) -> Path:
        return self.state / "mlflow-webhook.json"

    def _webhook_keys(self, create: bool) -> dict[str, str] | None:
        """The alias webhook's signing secret and the Fernet key the embedded MLflow server
        encrypts stored webhook secrets with (stable across restarts, or it could not read
        them back); made once, 0600."""
        if self.webhook_keys_file.exists():
            return json.loads(self.webhook_keys_file.read_text())
        if not create:
            return None
        self.state.mkdir(parents=True, exist_ok=True)
        keys = {
            "mlflow_webhook_secret": secrets.token_urlsafe(32),
            "encryption_key": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        }
        fd = os.open(self.webhook_keys_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(keys, f)
        return keys

    def resolved_settings(self, create: bool = False) -> Settings:
        """Settings with absolute paths, the farm key, the alias webhook's secret and the
        embedded store's credentials."""
        settings = self.settings
        key = self.encryption_keys(create)
        if key is not None:
            settings = settings.model_copy(update={"encryption_keys": SecretStr(key)})
        keys = self._webhook_keys(create)
        if keys and settings.mlflow_webhook_secret is None:
            settings = settings.model_copy(
                update={"mlflow_webhook_secret": SecretStr(keys["mlflow_webhook_secret"])}
            )
        if settings.s3_endpoint:
            return settings
        creds = self._embedded_credentials(create)
        if creds is None:
            return settings
        return settings.model_copy(update={k: SecretStr(v) for k, v in creds.items()})

    # --- components -------------------------------------------------------------------------
    def _s3(self, s: Settings) -> ManagedProcess:
        data = self.state / "objects"
        key = f"{s.s3_access_key.get_secret_value()},{s.s3_secret_key.get_secret_value()}"
        argv = [
            _bin("rclone"),
            "serve",
            "s3",
            str(data),
            "--addr",
            f"{s.host}:{s.s3_port}",
            "--etag-hash",
            "auto",
            "--config",
            "/dev/null",
        ]
        store = ObjectStore.from_settings(s)
        # The key pair goes through the environment, not argv, so `ps` does not show it;
        # CSV-quoted because rclone splits list-valued env vars on commas.
        env = child_env({"RCLONE_AUTH_KEY": f'"{key}"'})
        spec = ProcessSpec("s3", argv, s.s3_port, "s3_port", store.ping, env=env)
        data.mkdir(parents=True, exist_ok=True)
        return ManagedProcess(spec, self.state, s.host)

    def _mlflow(self, s: Settings) -> ManagedProcess:
        argv = [
            _bin("mlflow"),
            "server",
            "--host",
            s.host,
            "--port",
            str(s.mlflow_port),
            "--backend-store-uri",
            s.resolved_mlflow_backend_uri,
            "--artifacts-destination",
            f"s3://{s.mlflow_artifacts_bucket}",
            "--serve-artifacts",
            "--workers",
            "1",
        ]
        env = child_env(
            {
                "MLFLOW_S3_ENDPOINT_URL": s.resolved_s3_endpoint,
                "AWS_ACCESS_KEY_ID": s.s3_access_key.get_secret_value(),
                "AWS_SECRET_ACCESS_KEY": s.s3_secret_key.get_secret_value(),
                "AWS_DEFAULT_REGION": s.s3_region,
                # MLflow 3's server jobs (GenAI judges, prompt optimisation) start a job runner
                # and seven Huey consumers: ~35 s of CPU at every start and ~1.4 GB of memory,
                # for features the farm never calls. Webhooks do not use them.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                **self._mlflow_webhook_env(s),
            }
        )
        probe = lambda: http_ok(f"{s.resolved_mlflow_uri}/health")  # noqa: E731
        spec = ProcessSpec("mlflow", argv, s.mlflow_port, "mlflow_port", probe, env=env)
        return ManagedProcess(spec, self.state, s.host)

    def _mlflow_webhook_env(self, s: Settings) -> dict[str, str]:
        """What the embedded MLflow server needs to deliver the farm's alias webhook: a stable
        key for the stored secret, and leave to call the ingress over plain http on this
        private interface (MLflow allows only public https URLs by default). Its webhook list
        is cached for seconds, not a minute, so a webhook registered on a running server
        takes effect at once."""
        keys = self._webhook_keys(create=False)
        if not s.alias_webhook or keys is None:
            return {}
        return {
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": keys["encryption_key"],
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            "MLFLOW_WEBHOOK_CACHE_TTL": "1",
        }

    def _ray(self, s: Settings) -> ManagedProcess:
        argv = [
            _bin("ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            s.host,
            "--port",
            str(s.ray_gcs_port),
            "--dashboard-host",
            s.host,
            "--dashboard-port",
            str(s.ray_dashboard_port),
            "--ray-client-server-port",
            str(s.ray_client_port),
            "--dashboard-agent-listen-port",
            str(s.ray_dashboard_agent_port),
            "--metrics-export-port",
            str(s.ray_metrics_export_port),
            "--num-cpus",
            str(s.ray_num_cpus or os.cpu_count() or 1),
            "--object-store-memory",
            str(s.ray_object_store_mb * 1024 * 1024),
            *self._worker_port_range(s),
            "--disable-usage-stats",
        ]
        probe = lambda: http_ok(f"{s.ray_dashboard_url}/api/version")  # noqa: E731
        spec = ProcessSpec(
            "ray",
            argv,
            s.ray_gcs_port,
            "ray_gcs_port",
            probe,
            env=_ray_env(),
            stop_timeout_s=RAY_STOP_TIMEOUT_S,
            extra_ports={
                "ray_dashboard_port": s.ray_dashboard_port,
                "ray_client_port": s.ray_client_port,
                "ray_dashboard_agent_port": s.ray_dashboard_agent_port,
                "ray_metrics_export_port": s.ray_metrics_export_port,
            },
        )
        return ManagedProcess(spec, self.state, s.host)

    @staticmethod
    def _worker_port_range(s: Settings) -> list[str]:
        """Ray's worker processes take ports in this range on every node of the stack; Settings
        keeps every service port outside it."""
        return [
            "--min-worker-port",
            str(s.ray_min_worker_port),
            "--max-worker-port",
            str(s.ray_max_worker_port),
        ]

    def _ray_worker(self, s: Settings, index: int) -> ManagedProcess:
        """Local worker node `index` (1-based): a second raylet on this machine that joins the
        embedded head with declared CPUs and GPUs, and a resource naming it."""
        resource = local_worker_resource(index)
        argv = [
            _bin("ray"),
            "start",
            "--block",
            "--address",
            self.ray_address(s),
            "--node-ip-address",
            s.host,
            "--num-cpus",
            str(s.ray_worker_cpus),
            "--num-gpus",
            str(s.ray_worker_gpus),
            "--resources",
            json.dumps({resource: 1}),
            "--object-store-memory",
            str(s.ray_object_store_mb * 1024 * 1024),
            # The head owns the fixed ports (dashboard agent included); a worker node takes free
            # ones, as Ray does for its other per-node ports (raylet, object manager, metrics).
            "--dashboard-agent-listen-port",
            "0",
            *self._worker_port_range(s),
            "--disable-usage-stats",
        ]
        dashboard = s.ray_dashboard_url
        probe = lambda: any(resource in n["resources_total"] for n in alive_nodes(dashboard))  # noqa: E731
        spec = ProcessSpec(
            f"ray-worker-{index}",
            argv,
            None,
            None,
            probe,
            env=_ray_env(),
            stop_timeout_s=RAY_STOP_TIMEOUT_S,
        )
        return ManagedProcess(spec, self.state, s.host)

    def _components(self, s: Settings) -> list[ManagedProcess]:
        out = []
        if not s.s3_endpoint:
            out.append(self._s3(s))
        if not s.mlflow_tracking_uri:
            out.append(self._mlflow(s))
        if not s.ray_address:
            out.append(self._ray(s))
            # One at a time: raylets starting together on one host race for socket names.
            out.extend(self._ray_worker(s, i) for i in range(1, s.ray_worker_nodes + 1))
        return out

    @staticmethod
    def _named(components: list[ManagedProcess], name: str) -> ManagedProcess:
        for c in components:
            if c.spec.name == name:
                return c
        raise StackError(
            f"no embedded component {name!r} (configured as external, or never started)"
        )

    def _start(self, component: ManagedProcess, s: Settings) -> bool:
        started = component.start(s.startup_timeout_s)
        if component.spec.name == "s3":
            store = ObjectStore.from_settings(s)
            store.ensure_bucket(s.s3_bucket)
            store.ensure_bucket(s.mlflow_artifacts_bucket)
        return started

    def start(self, name: str) -> bool:
        """Start one embedded component (s3, mlflow, ray, ray-worker-<i>) on its own; True if
        started now."""
        s = self.resolved_settings(create=True)
        return self._start(self._named(self._components(s), name), s)

    def component(self, name: str) -> ManagedProcess:
        """The embedded component called `name` (s3, mlflow, ray, ray-worker-<i>)."""
        return self._named(self._components_for_stop(self.resolved_settings()), name)

    def ray_address(self, s: Settings) -> str:
        return s.ray_address or f"{s.host}:{s.ray_gcs_port}"

    # --- up / down / status -----------------------------------------------------------------
    def base_model(self, s: Settings) -> BaseModelInfo:
        return ensure_base_model(s.base_model, self.state / "models", s.max_image_side)

    def check_external(self, s: Settings) -> None:
        """Fail fast, naming each setting to fix, when a service configured as external (or the
        database) does not answer; before anything is started."""
        problems = []
        if s.s3_endpoint and not ObjectStore.from_settings(s).ping():
            problems.append(
                "the object store configured by s3_endpoint (BRANDFARM_S3_ENDPOINT) cannot be "
                "reached, or refuses s3_access_key/s3_secret_key, or has no bucket s3_bucket "
                f"({s.s3_bucket}); fix those settings or unset s3_endpoint to run the embedded one"
            )
        if s.mlflow_tracking_uri and not http_ok(f"{s.resolved_mlflow_uri}/health", timeout=5):
            problems.append(
                "the MLflow server configured by mlflow_tracking_uri "
                "(BRANDFARM_MLFLOW_TRACKING_URI) does not answer /health; fix it or unset it to "
                "run the embedded one"
            )
        if s.ray_address and not http_ok(f"{s.ray_dashboard_url}/api/version", timeout=5):
            problems.append(
                "the Ray cluster named by ray_address (BRANDFARM_RAY_ADDRESS or RAY_ADDRESS) "
                f"does not answer on its dashboard port {s.ray_dashboard_port} "
                "(ray_dashboard_port); fix either, or unset ray_address to start a local head"
            )
        problem = database_problem(s.resolved_database_url)
        if problem:
            problems.append(
                f"the database named by database_url (BRANDFARM_DATABASE_URL) {problem}; "
                "fix the URL or unset it to use SQLite in the state directory"
            )
        try:  # the C2PA signing identity (the farm CA is created here on the first up)
            load_signing_identity(s, create_default=True)
        except SigningSetupError as e:
            problems.append(f"the C2PA signing identity cannot be used: {e}")
        if problems:
            raise StackError("; ".join(problems))

    def up(self, redeploy: bool = False) -> Settings:
        """Start everything not external; returns the resolved settings the farm runs with."""
        s = self.resolved_settings(create=True)
        self.check_external(s)
        (self.state / "logs").mkdir(parents=True, exist_ok=True)
        # Fine-tune jobs read the farm's credentials from this 0600 file on the node, never
        # from their Ray job's runtime env (which Ray shows on its dashboard).
        s.write_secrets_file()
        for component in self._components(s):
            self.progress(f"starting {component.spec.name}{_where(component.spec)}")
            started = self._start(component, s)
            self.progress(f"{component.spec.name}: {'started' if started else 'already running'}")
        self._register_alias_webhook(s)
        self.progress(f"base model {s.base_model}")
        model = self.base_model(s)
        if redeploy or not self._api_serves(s, model):
            self.progress("deploying the Serve application (loads the model on each replica)")
            self._deploy(s, model)
        self.progress(f"API answering at {s.api_url}")
        return s

    def _register_alias_webhook(self, s: Settings) -> None:
        """MLflow's alias webhook (idempotent); without it alias changes made outside the
        farm's API wait for adapter_resolve_ttl_s (the ingress says so in /healthz)."""
        if not s.alias_webhook:
            return
        try:
            alias_webhook.register(s)
            self.progress(f"MLflow alias webhook → {alias_webhook.webhook_url(s)}")
        except alias_webhook.WebhookUnavailable as e:
            self.progress(
                f"MLflow alias webhook unavailable ({e}); alias changes reach serving within "
                f"adapter_resolve_ttl_s={s.adapter_resolve_ttl_s:g}s"
            )

    def _api_serves(self, s: Settings, model: BaseModelInfo) -> bool:
        try:
            with urllib.request.urlopen(f"{s.api_url}/healthz", timeout=2) as resp:
                return json.loads(resp.read()).get("model") == model.id
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def redeploy(self, s: Settings) -> None:
        """Deploy the Serve application again on the running stack, built from `s` (Serve
        rolls its replicas over to the new options); for tests and benchmarks that change
        serving settings without restarting the services."""
        self._deploy(s, self.base_model(s))

    def _deploy(self, s: Settings, model: BaseModelInfo) -> None:
        import ray
        from ray import serve

        from serve.app import APP_NAME, build_app

        ray.init(address=self.ray_address(s), logging_level="ERROR", log_to_driver=False)
        try:
            serve.start(http_options=http_options(s))
            serve.run(build_app(s, model), name=APP_NAME, route_prefix="/", blocking=False)
            deadline = time.monotonic() + s.startup_timeout_s
            while not self._api_serves(s, model):
                if time.monotonic() > deadline:
                    raise StackError(
                        f"the Serve application did not answer at {s.api_url}/healthz within "
                        f"{s.startup_timeout_s:.0f}s; see the Ray dashboard "
                        f"{s.ray_dashboard_url} (Serve tab) for replica errors"
                    )
                time.sleep(1)
        finally:
            ray.shutdown()

    def down(self) -> list[str]:
        """Stop what `up` started (reverse order); data stays. Returns the names stopped."""
        s = self.resolved_settings()
        stopped = []
        if s.ray_address:  # external cluster: remove our app, leave the cluster alone
            import ray
            from ray import serve

            from serve.app import APP_NAME

            ray.init(address=s.ray_address, logging_level="ERROR", log_to_driver=False)
            try:
                serve.delete(APP_NAME)
                stopped.append("serve-app")
            finally:
                ray.shutdown()
        for component in reversed(self._components_for_stop(s)):
            if component.stop():
                stopped.append(component.spec.name)
        return stopped

    def topology(self) -> Topology:
        """The cluster's nodes, the diffusion replicas on each, and the adapters they hold."""
        return read_topology(self.ray_address(self.resolved_settings()))

    def _components_for_stop(self, s: Settings) -> list[ManagedProcess]:
        # Without credentials (never started) there is nothing recorded to stop.
        if s.s3_access_key is None:
            return []
        components = self._components(s)
        # Worker nodes an earlier `up --workers N` recorded beyond today's count stop too.
        configured = 0 if s.ray_address else s.ray_worker_nodes
        for pidfile in (self.state / "run").glob("ray-worker-*.json"):
            index = pidfile.stem.removeprefix("ray-worker-")
            if index.isdigit() and int(index) > configured:
                components.append(self._ray_worker(s, int(index)))
        return components

    def status(self) -> list[ComponentStatus]:
        s = self.resolved_settings()
        rows = []
        managed = {c.spec.name: c for c in self._components_for_stop(s)}

        def row(name: str, url: str, answers: bool) -> ComponentStatus:
            comp = managed.get(name)
            return ComponentStatus(
                name, url, comp is not None, comp and comp.recorded_pid(), answers
            )

        s3_ok = s.s3_access_key is not None and ObjectStore.from_settings(s).ping()
        rows.append(row("s3", s.resolved_s3_endpoint, s3_ok))
        rows.append(
            row("mlflow", s.resolved_mlflow_uri, http_ok(f"{s.resolved_mlflow_uri}/health"))
        )
        ray_url = s.ray_address or s.ray_dashboard_url
        rows.append(row("ray", ray_url, http_ok(f"{s.ray_dashboard_url}/api/version")))
        for name, component in managed.items():
            if name.startswith("ray-worker-"):
                rows.append(row(name, f"node of {self.ray_address(s)}", component.spec.probe()))
        api = row("api", s.api_url, http_ok(f"{s.api_url}/healthz"))
        # The API is the Serve app on Ray: embedded exactly when Ray is.
        rows.append(ComponentStatus(api.name, api.url, not s.ray_address, None, api.answers))
        return rows
