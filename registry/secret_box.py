"""Tenant secrets encrypted at rest in the farm database with the farm's keys
(`encryption_keys`: Fernet, AES-128-CBC with HMAC-SHA256, from `cryptography`).

A sealed value is `fernet:` + a Fernet token. The first key seals; every key opens, so keys rotate
without downtime: put a new key first (every process must have it before it seals with it),
restart, reseal the rows (`brandfarm secrets reseal`), then drop the old key. A value without
the prefix is a row written before encryption (a plain `whsec_` secret): it is opened as it is,
and sealed by `reseal`, which every ingress runs at start.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from registry.settings import Settings

PREFIX = "fernet:"


class SecretKeyError(RuntimeError):
    """No farm key, or none of them opens a sealed value."""


def new_key() -> str:
    return Fernet.generate_key().decode()


def parse_keys(value: str) -> list[str]:
    """`encryption_keys` as a list: comma-separated, newest first."""
    return [k.strip() for k in value.split(",") if k.strip()]


class SecretBox:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise SecretKeyError("no encryption key given")
        try:
            fernets = [Fernet(k.encode()) for k in keys]
            self._first = fernets[0]
            self._fernet = MultiFernet(fernets)
        except ValueError as e:
            raise SecretKeyError(
                "encryption_keys holds a key that is not a Fernet key (32 url-safe base64 "
                f"bytes; make one with `brandfarm secrets new-key`): {e}"
            ) from None

    @classmethod
    def of_settings(cls, settings: Settings) -> SecretBox | None:
        """The farm's box, or None when `encryption_keys` is unset."""
        keys = parse_keys(
            settings.encryption_keys.get_secret_value() if settings.encryption_keys else ""
        )
        return cls(keys) if keys else None

    @staticmethod
    def is_sealed(value: str) -> bool:
        return value.startswith(PREFIX)

    def seal(self, plain: str) -> str:
        return PREFIX + self._fernet.encrypt(plain.encode()).decode()

    def open(self, stored: str) -> str:
        if not self.is_sealed(stored):
            return stored  # written before encryption; `reseal` seals it
        try:
            return self._fernet.decrypt(stored.removeprefix(PREFIX).encode()).decode()
        except InvalidToken:
            raise SecretKeyError(
                "a webhook secret in the farm database was sealed with a key that is not in "
                "encryption_keys; add the key it was sealed with (after the new one)"
            ) from None

    def is_current(self, stored: str) -> bool:
        """Sealed with the first key (nothing for `reseal` to do)."""
        if not self.is_sealed(stored):
            return False
        try:
            self._first.decrypt(stored.removeprefix(PREFIX).encode())
        except InvalidToken:
            return False
        return True

    def reseal(self, stored: str) -> str:
        """`stored` sealed with the first key (a plain value is sealed; a sealed one is
        re-encrypted, so that older keys can be dropped)."""
        if not self.is_sealed(stored):
            return self.seal(stored)
        try:
            return PREFIX + self._fernet.rotate(stored.removeprefix(PREFIX).encode()).decode()
        except InvalidToken:
            raise SecretKeyError(
                "a webhook secret was sealed with a key that is not in encryption_keys"
            ) from None


def missing_key(what: str) -> SecretKeyError:
    return SecretKeyError(
        f"{what}: webhook secrets are encrypted at rest with the farm key, and the "
        "encryption_keys setting is not set. `brandfarm up` creates it for an embedded farm "
        "(<state_dir>/credentials.json, passed to the farm's processes in secrets.json); "
        "elsewhere set BRANDFARM_ENCRYPTION_KEYS from your secret store"
    )
