"""Which URLs the farm may send webhooks to (its guard against server-side request forgery).

A webhook URL must be https, and every address its host resolves to must be a public one: no
loopback, private, link-local, multicast, reserved or unspecified address, so a tenant cannot
point the farm at its own network. Hosts in the `webhook_allow_hosts` setting are exempt (an
in-cluster receiver; the tests' loopback receiver), plain http included. The check runs when a
URL is set and again before each delivery, since DNS answers may change in between; the delivery
then connects to the very address it checked (`delivery_address`).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from registry.settings import Settings
from registry.webhooks import MAX_URL_CHARS
from serve.errors import InvalidField

FIELD = "webhook_url"


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (tests replace this; nothing else should)."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise InvalidField(FIELD, f"webhook_url host {host!r} does not resolve") from e
    return sorted({info[4][0] for info in infos})


def _refused(address: str) -> str | None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # Most specific first: 127.0.0.1 and 169.254.0.0/16 are "private" as well.
    for kind in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:  # shared address space (100.64/10) and the like
        return "non-public"
    return None


def _checked(url: str, settings: Settings, field: str) -> list[str] | None:
    """The addresses `url`'s host resolves to, all public (None: an allowed host, unchecked);
    InvalidField (400) naming `field` if the farm may not deliver to it."""
    if len(url) > MAX_URL_CHARS:
        raise InvalidField(field, f"{field} must be at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InvalidField(field, f"{field} is not a valid URL: {e}") from e
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidField(field, f"{field} must be an https:// URL with a host, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise InvalidField(field, f"{field} must not carry credentials (user:password@)")
    if host in {h.lower() for h in settings.webhook_allow_hosts}:
        return None
    if parts.scheme != "https":
        raise InvalidField(field, f"{field} must use https, got {parts.scheme}://")
    try:
        addresses = [str(ipaddress.ip_address(host))]  # an IP literal is its own answer
    except ValueError:
        addresses = resolve(host, port or 443)
    for address in addresses:
        why = _refused(address)
        if why is not None:
            raise InvalidField(
                field,
                f"{field} host {host!r} resolves to the {why} address {address}; webhooks go "
                "only to public addresses (an operator may allow a host in webhook_allow_hosts)",
            )
    return addresses


def check_webhook_url(url: str, settings: Settings, field: str = FIELD) -> str:
    """`url` if the farm may deliver webhooks to it; else InvalidField (400) naming `field`."""
    _checked(url, settings, field)
    return url


def delivery_address(url: str, settings: Settings) -> str | None:
    """Check `url` again before a delivery and return the address to connect to: one that was
    just checked, so that a DNS answer changing after the check (rebinding) cannot send the
    request elsewhere. None for an allowed host, which is connected to by name."""
    addresses = _checked(url, settings, FIELD)
    return addresses[0] if addresses else None
