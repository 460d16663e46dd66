"""Who is calling: a client identity string from an ordered list of sources.

Sources (``clients.identity`` in the config, tried in order; the first that yields a value wins):

``header:NAME``
    A request metadata header, e.g. ``header:x-api-key``. The value itself is never kept, logged
    or sent anywhere: the identity is ``key:`` + HMAC-SHA256(secret, value), hex, truncated to
    128 bits. The secret comes from the environment variable named by ``key_secret_env``; without
    it a random per-process secret is used (hashes then differ between replicas and restarts,
    which breaks limits shared through Redis, so a warning is logged).
``mtls``
    The verified client certificate's subject (``x509_subject``, else
    ``x509_common_name``) from the gRPC auth context: ``mtls:CN=...``. Absent on plaintext.
``peer``
    The TCP peer's address without its port: ``peer:10.0.0.7``. When the direct peer is inside
    ``trusted_proxies`` (CIDRs), ``x-forwarded-for`` is read right to left and the first address
    that is not a trusted proxy is the client; a peer outside ``trusted_proxies`` cannot choose
    its identity by sending the header.

No source yields a value: ``unknown``, a bucket of its own.

Caution: a header source identifies whoever sends that header; Bastion does not check that an
API key is valid. A client free to invent keys is free to invent identities, so use a header
source only where the keys are authenticated (by a gateway in front, or the upstream) or list it
after ``mtls``/``peer``.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import urllib.parse

from bastion.clients_config import DEFAULT_KEY_SECRET_ENV, IPNetwork, check_source, parse_networks

log = logging.getLogger("bastion.identity")

UNKNOWN = "unknown"
KEY_HASH_HEX_CHARS = 32              # 128 bits of HMAC-SHA256
MAX_SUBJECT_CHARS = 512
MAX_FORWARDED_HOPS = 32              # x-forwarded-for entries looked at, right to left
PEER_CACHE_SIZE = 4096               # (peer, x-forwarded-for) -> identity, cleared when full
PEER_CACHE_MAX_FORWARDED = 256       # longer x-forwarded-for values are not cached
FORWARDED_HEADER = "x-forwarded-for"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _normalize(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_address(text: str) -> IPAddress | None:
    """An address as written in x-forwarded-for or a gRPC peer: ``1.2.3.4``, ``1.2.3.4:80``,
    ``2001:db8::1``, ``[2001:db8::1]:80``; None when it is none of these."""
    text = text.strip().strip('"')
    if not text:
        return None
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:                       # IPv4 with a port
        text = text.partition(":")[0]
    try:
        return _normalize(ipaddress.ip_address(text))
    except ValueError:
        return None


def peer_host(peer: str | None) -> str | None:
    """The host part of a gRPC peer string: ``ipv4:127.0.0.1:5555`` -> ``127.0.0.1``,
    ``ipv6:[::1]:5555`` (or its %5B/%5D-escaped form) -> ``::1``, ``unix:/path`` -> ``unix:/path``."""
    if not peer:
        return None
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        rest = urllib.parse.unquote(rest)
        if rest.startswith("["):
            host = rest[1:].partition("]")[0]
        else:
            host = rest.rsplit(":", 1)[0] if kind == "ipv4" else rest
        address = parse_address(host)
        return str(address) if address is not None else host or None
    if kind == "unix":
        return f"unix:{rest}" if rest else "unix"
    return peer


class IdentityResolver:
    """One config compiled: parsed networks, the HMAC key, the header names to look up."""

    def __init__(self, config):
        self.sources: tuple[str, ...] = tuple(check_source(s) for s in config.identity)
        self.trusted: tuple[IPNetwork, ...] = parse_networks(config.trusted_proxies)
        env = getattr(config, "key_secret_env", DEFAULT_KEY_SECRET_ENV)
        secret = os.environ.get(env)
        if not secret and any(s.startswith("header:") for s in self.sources):
            log.warning("identity: %s is not set; API keys are hashed with a random per-process "
                        "key, so identities differ between replicas and restarts", env)
        self._key = secret.encode() if secret else secrets.token_bytes(32)
        self._peer_cache: dict[tuple, str] = {}
        self._wanted = {s.partition(":")[2] for s in self.sources if s.startswith("header:")}
        if self.trusted:
            self._wanted.add(FORWARDED_HEADER)

    # ---- pieces --------------------------------------------------------------------------
    def key_identity(self, value: str) -> str:
        digest = hmac.new(self._key, value.encode("utf-8", "surrogateescape"), hashlib.sha256)
        return "key:" + digest.hexdigest()[:KEY_HASH_HEX_CHARS]

    def _is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self.trusted)

    def _headers(self, context) -> dict[str, list[str]]:
        if not self._wanted:
            return {}
        found: dict[str, list[str]] = {}
        try:
            metadata = context.invocation_metadata() or ()
        except Exception:  # noqa: BLE001 - a context without metadata has no headers
            return found
        for item in metadata:
            key, value = item[0], item[1]
            key = key.lower()
            if key in self._wanted and isinstance(value, str):
                found.setdefault(key, []).append(value)
        return found

    @staticmethod
    def _mtls(context) -> str | None:
        try:
            auth = context.auth_context() or {}
        except Exception:  # noqa: BLE001 - no auth context: no certificate
            return None
        # gRPC core names the verified subject "x509_subject"; "x509_subject_name" kept for fakes.
        for key in ("x509_subject", "x509_subject_name", "x509_common_name"):
            values = auth.get(key)
            if values:
                value = values[0]
                text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
                text = text.strip()
                if text:
                    return "mtls:" + text[:MAX_SUBJECT_CHARS]
        return None

    def _peer(self, context, headers: dict[str, list[str]]) -> str | None:
        try:
            peer = context.peer()
        except Exception:  # noqa: BLE001
            return None
        forwarded = headers.get(FORWARDED_HEADER)
        if forwarded and sum(map(len, forwarded)) > PEER_CACHE_MAX_FORWARDED:
            return self._peer_uncached(peer, forwarded) or None
        key = (peer, tuple(forwarded) if forwarded else None)
        identity = self._peer_cache.get(key)
        if identity is None:
            identity = self._peer_uncached(peer, forwarded)
            if len(self._peer_cache) >= PEER_CACHE_SIZE:
                self._peer_cache.clear()
            self._peer_cache[key] = identity
        return identity or None

    def _peer_uncached(self, peer: str | None, forwarded: list[str] | None) -> str:
        host = peer_host(peer)
        if host is None:
            return ""
        if self.trusted:
            direct = parse_address(host)
            if direct is not None and self._is_trusted(direct):
                if forwarded:
                    client = self._forwarded_client(",".join(forwarded), direct)
                    return f"peer:{client}"
        return f"peer:{host}"

    def _forwarded_client(self, header: str, direct: IPAddress) -> IPAddress:
        """Right-most address in x-forwarded-for that is not a trusted proxy. If every hop is
        trusted, the left-most; an unparseable hop stops the walk at the last good one."""
        last = direct
        hops = header.split(",")
        for hop in reversed(hops[-MAX_FORWARDED_HOPS:]):
            address = parse_address(hop)
            if address is None:
                return last
            if not self._is_trusted(address):
                return address
            last = address
        return last

    # ---- the whole thing -----------------------------------------------------------------
    def resolve(self, context) -> str:
        headers = self._headers(context)
        for source in self.sources:
            if source == "peer":
                identity = self._peer(context, headers)
            elif source == "mtls":
                identity = self._mtls(context)
            else:
                values = headers.get(source[7:])
                value = values[0].strip() if values else ""
                identity = self.key_identity(value) if value else None
            if identity:
                return identity
        return UNKNOWN


_CACHE: dict[int, tuple[object, IdentityResolver]] = {}
_CACHE_SIZE = 8


def resolver_for(config) -> IdentityResolver:
    """The compiled resolver for a config object (cached by identity: configs are frozen)."""
    entry = _CACHE.get(id(config))
    if entry is not None and entry[0] is config:
        return entry[1]
    resolver = IdentityResolver(config)
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[id(config)] = (config, resolver)
    return resolver


def resolve_identity(context, config) -> str:
    """The client identity for one call. ``context`` is a grpc.aio ServicerContext (anything with
    ``peer()``, ``invocation_metadata()`` and ``auth_context()``); ``config`` anything with
    ``identity``, ``trusted_proxies`` and ``key_secret_env`` (a ``ClientsConfig``)."""
    return resolver_for(config).resolve(context)
