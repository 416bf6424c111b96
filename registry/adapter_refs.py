"""What a render request or API call may name as an adapter, checked without MLflow or torch.

Tenant ids and brands share one shape; aliases follow MLflow's rules; a reference is ``brand``
(alias production), ``brand@alias`` or ``brand:version``. `registry.adapters` re-exports these;
the engine side imports them from here so that it runs where MLflow is not installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PRODUCTION = "production"  # the alias a bare brand ("acme") resolves to
#: The highest version a registry can hold: MLflow stores versions as a signed 32-bit SQL
#: integer, so a reference above this cannot exist and is refused without asking MLflow.
MAX_VERSION = 2**31 - 1

# Tenant ids and brands share one shape; it holds no LIKE wildcard (`%`, `_`), quote or dot.
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_MLFLOW_RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$")  # MLflow refuses these
_REF = re.compile(r"^(?P<brand>[^@:]*)(?:@(?P<alias>[^@:]*)|:(?P<version>[^@:]*))?$")


def check_name(field_name: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"{field_name} {value!r} is invalid: use 2-63 characters of a-z, 0-9 and '-', "
            "starting with a letter or digit"
        )
    return value


def check_alias(alias: str) -> str:
    """Validate an alias name (`production`, `staging`, `canary`, ...) or raise `ValueError`."""
    if not isinstance(alias, str) or not _ALIAS.match(alias):
        raise ValueError(
            f"alias {alias!r} is invalid: use 1-32 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter"
        )
    if _MLFLOW_RESERVED_ALIAS.match(alias):
        raise ValueError(f"alias {alias!r} is reserved by MLflow ('latest' and 'v<number>')")
    return alias


def check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise ValueError(f"version {version!r} is invalid: use an integer from 1 to {MAX_VERSION}")
    return version


@dataclass(frozen=True)
class AdapterRef:
    """What a request names: ``acme`` (alias production), ``acme@staging`` or ``acme:3``."""

    brand: str
    alias: str | None = None
    version: int | None = None

    def __post_init__(self) -> None:
        check_name("brand", self.brand)
        if (self.alias is None) == (self.version is None):
            raise ValueError("an adapter reference names exactly one of an alias or a version")
        if self.alias is not None:
            check_alias(self.alias)
        else:
            check_version(self.version)

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        """Parse ``brand``, ``brand@alias`` or ``brand:version``; `ValueError` says what's wrong."""
        match = _REF.match(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(
                f"adapter reference {text!r} is malformed: use 'brand', 'brand@alias' or "
                "'brand:version' (e.g. 'acme', 'acme@staging', 'acme:3')"
            )
        brand, alias, version = match.group("brand", "alias", "version")
        if version is not None:
            # Length first: int() of a huge digit string is slow, and refused past 4300 digits.
            if (
                not (version.isascii() and version.isdigit())
                or len(version) > len(str(MAX_VERSION))
                or not 1 <= int(version) <= MAX_VERSION
            ):
                raise ValueError(
                    f"adapter reference {text!r}: the version after ':' must be an integer "
                    f"from 1 to {MAX_VERSION} (e.g. 'acme:3')"
                )
            return cls(brand, version=int(version))
        return cls(brand, alias=PRODUCTION if alias is None else alias)

    def __str__(self) -> str:
        return f"{self.brand}@{self.alias}" if self.alias else f"{self.brand}:{self.version}"
