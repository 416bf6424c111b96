"""All object I/O of the farm: one S3 bucket, a prefix per tenant, checksums, presigned URLs.

Talks S3 through the `minio` SDK to the embedded `rclone serve s3` or any S3/MinIO endpoint.
Every SDK or transport error leaves this module as a `StorageError` (or `ObjectNotFound`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from registry.settings import Settings

SHA256_META = "sha256"
_TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")


class StorageError(RuntimeError):
    """The object store failed or could not be reached."""


class ObjectNotFound(StorageError):
    """No object at that key."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None
    content_type: str | None = None


def tenant_prefix(tenant_id: str) -> str:
    """The only prefix a tenant's objects live under."""
    if not _TENANT_ID.match(tenant_id):
        raise ValueError(f"invalid tenant id {tenant_id!r}")
    return f"tenants/{tenant_id}/"


def render_key(tenant_id: str, render_id: str, index: int, extension: str = "png") -> str:
    return f"{tenant_prefix(tenant_id)}renders/{render_id}/{index}.{extension}"


@dataclass(frozen=True)
class StoreTimeouts:
    """Bounds on every S3 call: a dead or hung endpoint fails the call, never stalls it."""

    connect_s: float = 5.0
    read_s: float = 30.0
    retries: int = 2


def _client(
    endpoint: str, access_key: str, secret_key: str, region: str, timeouts: StoreTimeouts
) -> Minio:
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if not parts.netloc:
        raise ValueError(f"invalid S3 endpoint {endpoint!r}")
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=timeouts.connect_s, read=timeouts.read_s),
        # S3 asks clients to retry 500 InternalError ("please try again"); `rclone serve s3`
        # answers it now and then to concurrent PUTs. urllib3 retries only idempotent methods
        # (GET, HEAD, PUT, DELETE), so a multipart POST is never sent twice.
        retries=urllib3.Retry(
            total=timeouts.retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
        ),
        maxsize=16,
    )
    return Minio(
        parts.netloc,
        access_key=access_key,
        secret_key=secret_key,
        secure=parts.scheme == "https",
        region=region,
        http_client=http,
    )


class ObjectStore:
    """A bucket on an S3 endpoint. Thread-safe (the minio client is)."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        region: str = "us-east-1",
        public_endpoint: str | None = None,
        timeouts: StoreTimeouts = StoreTimeouts(),
    ) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self._client = _client(endpoint, access_key, secret_key, region, timeouts)
        # Presigning is pure computation (region given), so a client for the public host is cheap.
        self._presigner = (
            _client(public_endpoint, access_key, secret_key, region, timeouts)
            if public_endpoint
            else self._client
        )

    @classmethod
    def from_settings(cls, settings: Settings, bucket: str | None = None) -> ObjectStore:
        """The farm's object store; `bucket` defaults to the tenant bucket (`s3_bucket`)."""
        if settings.s3_access_key is None or settings.s3_secret_key is None:
            raise StorageError(
                "no S3 credentials: run `brandfarm up` (embedded store) or set "
                "BRANDFARM_S3_ACCESS_KEY / BRANDFARM_S3_SECRET_KEY"
            )
        return cls(
            endpoint=settings.resolved_s3_endpoint,
            access_key=settings.s3_access_key.get_secret_value(),
            secret_key=settings.s3_secret_key.get_secret_value(),
            bucket=bucket or settings.s3_bucket,
            region=settings.s3_region,
            public_endpoint=settings.s3_public_endpoint,
            timeouts=StoreTimeouts(
                connect_s=settings.s3_connect_timeout_s,
                read_s=settings.s3_read_timeout_s,
                retries=settings.s3_max_retries,
            ),
        )

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "NoSuchBucket"):
                raise ObjectNotFound(f"{what}: {e.code}") from e
            raise StorageError(f"{what} failed on {self.endpoint}: {e.code} {e.message}") from e
        except InvalidResponseError as e:
            # Some servers (rclone's GET of a missing key) answer 404 with an error body minio
            # cannot parse; the status still says "no such object". minio keeps it private,
            # and `__reduce__` is its public way out: (status, content type, body).
            if e.__reduce__()[1][0] == 404:
                raise ObjectNotFound(f"{what}: not found") from e
            raise StorageError(f"{what} failed on {self.endpoint}: {e}") from e
        except ServerError as e:
            raise StorageError(f"{what} failed on {self.endpoint}: {e}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise StorageError(f"{what}: object store at {self.endpoint} unreachable: {e}") from e

    def ensure_bucket(self, bucket: str | None = None) -> None:
        name = bucket or self.bucket
        if not self._call("bucket_exists", self._client.bucket_exists, name):
            self._call("make_bucket", self._client.make_bucket, name)

    def ping(self) -> bool:
        try:
            self._call("bucket_exists", self._client.bucket_exists, self.bucket)
            return True
        except StorageError:
            return False

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        """Write an object and verify the store holds exactly these bytes (size + sha256 tag)."""
        digest = hashlib.sha256(data).hexdigest()
        self._call(
            f"put {key}",
            self._client.put_object,
            self.bucket,
            key,
            io.BytesIO(data),
            len(data),
            content_type=content_type,
            metadata={SHA256_META: digest},
        )
        info = self.stat(key)
        if info.size != len(data):
            raise StorageError(f"put {key}: stored {info.size} bytes, sent {len(data)}")
        return ObjectInfo(key, len(data), digest, content_type)

    def get_bytes(self, key: str) -> bytes:
        resp = self._call(f"get {key}", self._client.get_object, self.bucket, key)
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def verify(self, key: str, sha256: str) -> None:
        """Re-read the stored object and check its sha256; `StorageError` if it differs."""
        resp = self._call(f"get {key}", self._client.get_object, self.bucket, key)
        h = hashlib.sha256()
        try:
            for chunk in resp.stream(1 << 20):
                h.update(chunk)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise StorageError(f"verify {key}: read failed: {e}") from e
        finally:
            resp.close()
            resp.release_conn()
        if h.hexdigest() != sha256:
            raise StorageError(f"verify {key}: stored sha256 {h.hexdigest()} != {sha256}")

    def stat(self, key: str) -> ObjectInfo:
        st = self._call(f"stat {key}", self._client.stat_object, self.bucket, key)
        meta = {k.lower(): v for k, v in (st.metadata or {}).items()}
        return ObjectInfo(key, st.size or 0, meta.get(f"x-amz-meta-{SHA256_META}"), st.content_type)

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
            return True
        except ObjectNotFound:
            return False

    def list(self, prefix: str) -> list[ObjectInfo]:
        objs = self._call(
            f"list {prefix}",
            lambda: list(self._client.list_objects(self.bucket, prefix=prefix, recursive=True)),
        )
        return [ObjectInfo(o.object_name, o.size or 0, None) for o in objs]

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", self._client.remove_object, self.bucket, key)

    def presigned_get(self, key: str, expires_s: int) -> str:
        return self._call(
            f"presign {key}",
            self._presigner.presigned_get_object,
            self.bucket,
            key,
            expires=dt.timedelta(seconds=expires_s),
        )
