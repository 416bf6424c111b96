"""The farm's C2PA signing identity: a certificate chain and a way to sign with its key.

By default `brandfarm up` creates a farm CA and an ES256 signer certificate in
`<state_dir>/provenance/` (keys 0600). Production names a chain and key file
(`provenance_signing_cert` / `provenance_signing_key`) or a factory returning a
`SigningIdentity` whose `sign` calls a KMS (`provenance_signer_factory`). Only file paths are
settings: key material never travels in a Ray job or a Serve config.
"""

from __future__ import annotations

import datetime
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from registry.settings import Settings

CA_CERT = "farm-ca.pem"
CA_KEY = "farm-ca.key"
SIGNER_CERT = "signer-chain.pem"  # signer first, then the farm CA
SIGNER_KEY = "signer.key"
CA_DAYS = 3650
SIGNER_DAYS = 825


class SigningSetupError(ValueError):
    """The signing identity cannot be used; the message names the file or setting to fix."""


@dataclass(frozen=True)
class SigningIdentity:
    """What signs manifests: the PEM chain (signer first) and a callback signing bytes with
    ES256 (DER or raw r||s signature, as c2pa accepts). A KMS hook returns one of these."""

    chain_pem: str
    sign: Callable[[bytes], bytes]


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "brandfarm"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, signer: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signer,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not signer,
        crl_sign=not signer,
        encipher_only=False,
        decipher_only=False,
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def create_farm_identity(folder: Path, now: datetime.datetime | None = None) -> None:
    """A new farm CA (P-256, self-signed) and a signer certificate it issues, for C2PA's
    profile: the signer is no CA, has digitalSignature and the emailProtection EKU."""
    now = now or datetime.datetime.now(datetime.UTC)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("brandfarm farm CA"))
        .issuer_name(_name("brandfarm farm CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signer=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    signer = (
        x509.CertificateBuilder()
        .subject_name(_name("brandfarm signer"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SIGNER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signer=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    _write_private(folder / CA_KEY, _pem_key(ca_key))
    _write_private(folder / SIGNER_KEY, _pem_key(key))
    (folder / CA_CERT).write_bytes(ca.public_bytes(pem))
    (folder / SIGNER_CERT).write_bytes(signer.public_bytes(pem) + ca.public_bytes(pem))


def default_folder(settings: Settings) -> Path:
    return settings.state_path / "provenance"


def _paths(settings: Settings) -> tuple[Path, Path, str, str]:
    """(chain file, key file, and the settings naming them) in use."""
    if settings.provenance_signing_cert or settings.provenance_signing_key:
        if not (settings.provenance_signing_cert and settings.provenance_signing_key):
            raise SigningSetupError(
                "provenance_signing_cert and provenance_signing_key must be set together "
                "(BRANDFARM_PROVENANCE_SIGNING_CERT / BRANDFARM_PROVENANCE_SIGNING_KEY)"
            )
        return (
            Path(settings.provenance_signing_cert),
            Path(settings.provenance_signing_key),
            "provenance_signing_cert",
            "provenance_signing_key",
        )
    folder = default_folder(settings)
    return folder / SIGNER_CERT, folder / SIGNER_KEY, "the farm signer", "the farm signer key"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SigningSetupError(f"{what} file {path} does not exist") from None
    except OSError as e:
        raise SigningSetupError(f"{what} file {path} cannot be read: {e.strerror}") from None


def _load_chain(path: Path, what: str, now: datetime.datetime) -> list[x509.Certificate]:
    pem = _read(path, what)
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise SigningSetupError(f"{what} file {path} holds no PEM certificate") from None
    for cert in chain:
        if cert.not_valid_after_utc < now:
            raise SigningSetupError(
                f"{what} file {path}: certificate {cert.subject.rfc4514_string()!r} expired "
                f"on {cert.not_valid_after_utc:%Y-%m-%d}; renew it"
                + (
                    " (or delete the folder to let `brandfarm up` create a new farm CA)"
                    if what == "the farm signer"
                    else ""
                )
            )
        if cert.not_valid_before_utc > now:
            raise SigningSetupError(
                f"{what} file {path}: certificate {cert.subject.rfc4514_string()!r} is not "
                f"valid before {cert.not_valid_before_utc:%Y-%m-%d}"
            )
    return chain


def load_signing_identity(
    settings: Settings, *, create_default: bool = False, now: datetime.datetime | None = None
) -> SigningIdentity:
    """The identity the settings name, checked: readable, unexpired, key matching the signer
    certificate. `create_default` makes the farm CA when no identity is configured and none
    exists yet (what `up` and an in-process app do). Raises `SigningSetupError` naming the file."""
    now = now or datetime.datetime.now(datetime.UTC)
    if settings.provenance_signer_factory:
        return _from_factory(settings)
    cert_path, key_path, cert_what, key_what = _paths(settings)
    if create_default and cert_what == "the farm signer" and not cert_path.exists():
        create_farm_identity(default_folder(settings), now)
    chain = _load_chain(cert_path, cert_what, now)
    key_pem = _read(key_path, key_what)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise SigningSetupError(
            f"{key_what} file {key_path} is not an unencrypted PEM private key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise SigningSetupError(f"{key_what} file {key_path} must hold an EC P-256 key (ES256)")
    if key.public_key() != chain[0].public_key():
        raise SigningSetupError(
            f"{key_what} file {key_path} does not match the first certificate of {cert_path}"
        )
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain).decode()
    return SigningIdentity(pem, lambda data: key.sign(data, ec.ECDSA(hashes.SHA256())))


def _from_factory(settings: Settings) -> SigningIdentity:
    spec = settings.provenance_signer_factory or ""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise SigningSetupError(
            f"provenance_signer_factory {spec!r} cannot be imported ({e}); "
            "use 'package.module:function'"
        ) from None
    identity = factory(settings)
    if not isinstance(identity, SigningIdentity):
        raise SigningSetupError(
            f"provenance_signer_factory {spec!r} returned {type(identity).__name__}, "
            "not a serve.signing.SigningIdentity"
        )
    return identity


def trust_anchors_pem(settings: Settings) -> str:
    """The CA certificates verification trusts: `provenance_trust_anchors`, else the root of
    the configured chain, else the farm CA. Empty when none exists yet."""
    if settings.provenance_trust_anchors:
        return _read(Path(settings.provenance_trust_anchors), "provenance_trust_anchors").decode()
    if settings.provenance_signing_cert:
        certs = x509.load_pem_x509_certificates(
            _read(Path(settings.provenance_signing_cert), "provenance_signing_cert")
        )
        return certs[-1].public_bytes(serialization.Encoding.PEM).decode()
    ca = default_folder(settings) / CA_CERT
    return ca.read_text() if ca.exists() else ""
