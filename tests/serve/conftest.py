"""The API in-process, with real parts and no Ray: the real engine on `tiny-sd-random` behind an
`EngineRenderer`, a SQLite database, the embedded object store (`rclone serve s3`, started by
`LocalStack` as `brandfarm up` does), and an MLflow address that refuses or never answers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cluster.processes import free_ports
from cluster.stack import LocalStack
from registry.base_models import TINY_RANDOM, BaseModelInfo, ensure_base_model
from registry.settings import Settings
from registry.storage import ObjectStore
from serve.adapter_cache import AdapterFetcher
from serve.api import ApiServices, create_api
from serve.local import EngineRenderer
from serve.services import build_services


class SilentServer:
    """A TCP server that accepts connections and never answers: a hung MLflow, as a stopped
    (SIGSTOP) process behaves once the kernel has accepted the connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._closed = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                if self._closed.is_set():
                    conn.close()
                    return
                self.accepted.append(conn)

    def close(self) -> None:
        """Drop every connection and stop listening: clients see a reset, then a refusal."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            # shutdown, not just close: on Linux only shutdown wakes a thread blocked in accept.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            for conn in self.accepted:
                with contextlib.suppress(OSError):
                    conn.close()


@dataclass
class LocalParts:
    """What every in-process app of a module shares: the model, its engine, the object store."""

    model: BaseModelInfo
    engine: object  # serve.engine.DiffusionEngine
    stack: LocalStack  # only its S3 component runs
    settings: Settings  # resolved: S3 credentials, state dir
    state: Path
    apps: list[ApiServices] = field(default_factory=list)

    def refused_url(self) -> str:
        return f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there

    def services(self, mlflow_url: str | None = None, **overrides: object) -> ApiServices:
        """Fresh services (own SQLite file, own pools) over the shared engine and store."""
        index = uuid.uuid4().hex[:12]  # unique even across LocalParts on one state dir
        settings = self.settings.model_copy(
            update={
                "mlflow_tracking_uri": mlflow_url or self.refused_url(),
                "database_url": f"sqlite:///{self.state / f'api-{index}.db'}",
                **overrides,
            }
        )
        Settings.model_validate(settings.model_dump())  # overrides obey the settings' rules
        fetcher = AdapterFetcher(
            ObjectStore.from_settings(settings, bucket=settings.mlflow_artifacts_bucket)
        )
        services = build_services(settings, self.model, EngineRenderer(self.engine, fetcher))
        self.apps.append(services)
        return services


def client(services: ApiServices, key: str | None = None) -> httpx.AsyncClient:
    """An async client on the app in-process (ASGI): every request runs the real middleware."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    transport = httpx.ASGITransport(app=create_api(services), raise_app_exceptions=False)
    return httpx.AsyncClient(
        transport=transport, base_url="http://brandfarm.test", headers=headers, timeout=120
    )


@pytest.fixture(scope="session")
def local_parts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalParts]:
    from serve.engine import DiffusionEngine

    state = tmp_path_factory.mktemp("local-api") / "state"
    ports = dict(
        zip(
            Settings.service_port_fields(),
            free_ports(len(Settings.service_port_fields())),
            strict=True,
        )
    )
    base = Settings(
        state_dir=state,
        **ports,
        base_model=TINY_RANDOM,
        device="cpu",
        startup_timeout_s=60,
        mlflow_request_timeout_s=2,
        mlflow_max_retries=0,
    )
    # MLflow's client takes its limits from the environment: put back what was there.
    saved = {k: os.environ.get(k) for k in base.mlflow_client_env()}
    stack = LocalStack(base)
    stack.start("s3")
    try:
        settings = stack.resolved_settings().model_copy(update={"mlflow_tracking_uri": None})
        model = ensure_base_model(TINY_RANDOM, state / "models", settings.max_image_side)
        engine = DiffusionEngine.load(model, "cpu")
        yield LocalParts(model, engine, stack, settings, state)
    finally:
        if stack.component("mlflow").recorded_pid() is not None:  # a module started it
            stack.component("mlflow").stop()
        stack.component("s3").stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
