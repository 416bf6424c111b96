"""`up` stops, naming the file, when the C2PA signing key or certificate is missing, expired or
unreadable; by default it creates the farm CA and signer, keys 0600."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest

from cluster.processes import StackError, free_ports
from cluster.stack import LocalStack
from registry.settings import Settings
from serve.signing import (
    CA_KEY,
    SIGNER_CERT,
    SIGNER_DAYS,
    SIGNER_KEY,
    create_farm_identity,
    default_folder,
    load_signing_identity,
)


def _settings(tmp_path: Path, **kw: object) -> Settings:
    fields = Settings.service_port_fields()
    ports = dict(zip(fields, free_ports(len(fields)), strict=True))
    return Settings(state_dir=tmp_path / "state", **{**ports, **kw})


def _preflight(settings: Settings) -> None:
    """`up`'s checks before anything starts (`LocalStack.check_external`)."""
    stack = LocalStack(settings)
    stack.check_external(stack.resolved_settings(create=True))


def _preflight_error(settings: Settings) -> str:
    with pytest.raises(StackError) as info:
        _preflight(settings)
    return str(info.value)


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    folder = tmp_path / "issued"
    create_farm_identity(folder)
    return folder


def test_default_identity_is_created_with_private_keys_0600(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _preflight(settings)
    folder = default_folder(settings)
    for name in (CA_KEY, SIGNER_KEY):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    identity = load_signing_identity(settings)
    assert identity.chain_pem.count("BEGIN CERTIFICATE") == 2


def test_missing_key_file_stops_up_naming_it(tmp_path: Path, chain: Path) -> None:
    missing = tmp_path / "nowhere" / "signer.key"
    settings = _settings(
        tmp_path, provenance_signing_cert=chain / SIGNER_CERT, provenance_signing_key=missing
    )
    with pytest.raises(StackError) as info:
        LocalStack(settings).up()
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)
    # Nothing was started.
    assert not list((settings.state_path / "run").glob("*.json"))


def test_expired_certificate_is_named(tmp_path: Path) -> None:
    old = tmp_path / "old"
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=SIGNER_DAYS + 10)
    create_farm_identity(old, now=past)
    message = _preflight_error(
        _settings(
            tmp_path,
            provenance_signing_cert=old / SIGNER_CERT,
            provenance_signing_key=old / SIGNER_KEY,
        )
    )
    assert str(old / SIGNER_CERT) in message and "expired" in message


def test_expired_default_identity_is_named(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=SIGNER_DAYS + 10)
    create_farm_identity(default_folder(settings), now=past)
    message = _preflight_error(settings)
    assert str(default_folder(settings) / SIGNER_CERT) in message and "expired" in message


@pytest.mark.parametrize("broken", ["cert", "key"])
def test_unreadable_files_are_named(tmp_path: Path, chain: Path, broken: str) -> None:
    garbage = tmp_path / f"garbage.{broken}"
    garbage.write_text("not PEM at all")
    cert = garbage if broken == "cert" else chain / SIGNER_CERT
    key = garbage if broken == "key" else chain / SIGNER_KEY
    message = _preflight_error(
        _settings(tmp_path, provenance_signing_cert=cert, provenance_signing_key=key)
    )
    assert str(garbage) in message


def test_a_key_of_another_certificate_is_refused(tmp_path: Path, chain: Path) -> None:
    other = tmp_path / "other"
    create_farm_identity(other)
    message = _preflight_error(
        _settings(
            tmp_path,
            provenance_signing_cert=chain / SIGNER_CERT,
            provenance_signing_key=other / SIGNER_KEY,
        )
    )
    assert str(other / SIGNER_KEY) in message and "does not match" in message


def test_a_kms_factory_that_cannot_be_imported_is_named(tmp_path: Path) -> None:
    message = _preflight_error(
        _settings(tmp_path, provenance_signer_factory="no_such_module:signer")
    )
    assert "provenance_signer_factory" in message
