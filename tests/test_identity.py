"""Client identity: header (keyed hash), mTLS subject, peer address, trusted proxies, unknown."""
from __future__ import annotations

import pytest

from bastion.proxy.identity import UNKNOWN, parse_address, peer_host, resolve_identity
from bastion.proxy.limiter import ClientsConfig

SECRET_ENV = "BASTION_TEST_CLIENT_KEY_SECRET"


class FakeContext:
    """What resolve_identity reads from a grpc.aio ServicerContext."""

    def __init__(self, peer="ipv4:203.0.113.9:5555", metadata=(), auth=None):
        self._peer = peer
        self._metadata = tuple(metadata)
        self._auth = auth or {}

    def peer(self):
        return self._peer

    def invocation_metadata(self):
        return self._metadata

    def auth_context(self):
        return self._auth


@pytest.fixture(autouse=True)
def _secret(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "test-secret-1")


def config(**kwargs) -> ClientsConfig:
    return ClientsConfig(key_secret_env=SECRET_ENV, **kwargs)


def test_peer_host_forms():
    assert peer_host("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:5555") == "::1"
    assert peer_host("ipv6:%5B2001:db8::7%5D:443") == "2001:db8::7"
    assert peer_host("ipv6:[::ffff:10.1.2.3]:80") == "10.1.2.3"
    assert peer_host("unix:/tmp/s.sock") == "unix:/tmp/s.sock"
    assert peer_host("") is None and peer_host(None) is None
    assert str(parse_address("[2001:db8::1]:80")) == "2001:db8::1"
    assert str(parse_address(" 198.51.100.4:8080 ")) == "198.51.100.4"
    assert parse_address("unknown") is None


def test_peer_source_drops_the_port():
    cfg = config(identity=["peer"])
    assert resolve_identity(FakeContext("ipv4:127.0.0.1:5555"), cfg) == "peer:127.0.0.1"
    assert resolve_identity(FakeContext("ipv4:127.0.0.1:6000"), cfg) == "peer:127.0.0.1"
    assert resolve_identity(FakeContext("ipv6:[::1]:6000"), cfg) == "peer:::1"


def test_header_key_is_hashed_stable_and_never_kept():
    cfg = config(identity=["header:X-Api-Key", "peer"])
    key = "sk-live-0123456789abcdef"
    first = resolve_identity(FakeContext(metadata=[("x-api-key", key)]), cfg)
    again = resolve_identity(FakeContext("ipv4:10.9.9.9:1", metadata=[("x-api-key", key)]), cfg)
    other = resolve_identity(FakeContext(metadata=[("x-api-key", key + "x")]), cfg)
    assert first == again, "the same key from another address is the same client"
    assert first != other
    assert first.startswith("key:") and len(first) == 4 + 32
    assert key not in first and "0123456789abcdef" not in first
    # The hash is keyed: another secret gives another identity.
    import os
    os.environ[SECRET_ENV] = "test-secret-2"
    try:
        rekeyed = resolve_identity(FakeContext(metadata=[("x-api-key", key)]),
                                   config(identity=["header:x-api-key"]))
    finally:
        os.environ[SECRET_ENV] = "test-secret-1"
    assert rekeyed != first
    # No header (or an empty one): the next source.
    assert resolve_identity(FakeContext(), cfg) == "peer:203.0.113.9"
    assert resolve_identity(FakeContext(metadata=[("x-api-key", "  ")]), cfg) == "peer:203.0.113.9"


def test_mtls_subject_when_present_and_absent_on_plaintext():
    cfg = config(identity=["mtls", "peer"])
    auth = {"transport_security_type": [b"ssl"],
            "x509_subject_name": [b"CN=billing-svc,O=Example"],
            "x509_common_name": [b"billing-svc"]}
    assert resolve_identity(FakeContext(auth=auth), cfg) == "mtls:CN=billing-svc,O=Example"
    only_cn = {"x509_common_name": [b"billing-svc"]}
    assert resolve_identity(FakeContext(auth=only_cn), cfg) == "mtls:billing-svc"
    plaintext = {"transport_security_type": [b"insecure"]}
    assert resolve_identity(FakeContext(auth=plaintext), cfg) == "peer:203.0.113.9"


def test_first_source_wins_in_order():
    auth = {"x509_subject_name": [b"CN=a"]}
    ctx = FakeContext(metadata=[("x-api-key", "k")], auth=auth)
    assert resolve_identity(ctx, config(identity=["mtls", "header:x-api-key"])) == "mtls:CN=a"
    assert resolve_identity(ctx, config(identity=["header:x-api-key", "mtls"])).startswith("key:")


def test_trusted_proxy_forwarded_for():
    cfg = config(identity=["peer"], trusted_proxies=["10.0.0.0/8", "192.168.1.1"])
    # Direct peer is a trusted proxy: right-most untrusted hop of x-forwarded-for.
    ctx = FakeContext("ipv4:10.0.0.5:443",
                      metadata=[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.2.3.4")])
    assert resolve_identity(ctx, cfg) == "peer:198.51.100.7", "spoofed left-most hop ignored"
    # Several headers are one list, in order.
    ctx = FakeContext("ipv4:192.168.1.1:443", metadata=[("x-forwarded-for", "6.6.6.6"),
                                                        ("x-forwarded-for", "198.51.100.8:1234")])
    assert resolve_identity(ctx, cfg) == "peer:198.51.100.8"
    # Every hop trusted: the left-most.
    ctx = FakeContext("ipv4:10.0.0.5:443", metadata=[("x-forwarded-for", "10.1.1.1, 10.2.2.2")])
    assert resolve_identity(ctx, cfg) == "peer:10.1.1.1"
    # Garbage behind a trusted hop: the walk stops at the last good (trusted) address.
    ctx = FakeContext("ipv4:10.0.0.5:443", metadata=[("x-forwarded-for", "nonsense, 10.2.2.2")])
    assert resolve_identity(ctx, cfg) == "peer:10.2.2.2"
    # Trusted peer without the header: the peer itself.
    assert resolve_identity(FakeContext("ipv4:10.0.0.5:443"), cfg) == "peer:10.0.0.5"


def test_untrusted_peer_cannot_choose_its_identity():
    cfg = config(identity=["peer"], trusted_proxies=["10.0.0.0/8"])
    ctx = FakeContext("ipv4:203.0.113.50:999", metadata=[("x-forwarded-for", "198.51.100.1")])
    assert resolve_identity(ctx, cfg) == "peer:203.0.113.50"
    # Without trusted_proxies the header is never read.
    plain = config(identity=["peer"])
    ctx = FakeContext("ipv4:10.0.0.5:999", metadata=[("x-forwarded-for", "198.51.100.1")])
    assert resolve_identity(ctx, plain) == "peer:10.0.0.5"


def test_unknown_bucket():
    cfg = config(identity=["header:x-api-key", "mtls"])
    assert resolve_identity(FakeContext(), cfg) == UNKNOWN
    assert resolve_identity(FakeContext(peer=""), config(identity=["peer"])) == UNKNOWN


def test_bad_sources_and_networks_are_config_errors():
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="unknown identity source"):
        ClientsConfig(identity=["cookie:session"])
    with pytest.raises(ValidationError, match="not an IP network"):
        ClientsConfig(trusted_proxies=["10.0.0.0/33"])
    with pytest.raises(ValidationError):
        ClientsConfig(identity=[])
    assert ClientsConfig(identity=["header: X-Api-Key "]).identity == ["header:x-api-key"]


def test_redis_shared_limits_with_header_identities_need_the_key_secret(monkeypatch, tmp_path):
    """Refused at load, with the fix in the error: otherwise each replica hashes the same API
    key with its own random key and the limits shared through Redis silently do not hold."""
    from pydantic import ValidationError
    monkeypatch.delenv("BASTION_CLIENT_KEY_SECRET", raising=False)
    shared = dict(backend="redis", identity=["header:x-api-key", "peer"],
                  limits={"rps": 1, "burst": 6})
    with pytest.raises(ValidationError, match="BASTION_CLIENT_KEY_SECRET") as refused:
        ClientsConfig(**shared)
    assert "same secret value on every replica" in str(refused.value)
    assert "client-key-secret.yaml" in str(refused.value)
    with pytest.raises(ValidationError, match="MY_SECRET"):
        ClientsConfig(**shared, key_secret_env="MY_SECRET")
    # Fine: memory backend (nothing shared), peer/mTLS identities (no key), or the secret set.
    ClientsConfig(**{**shared, "backend": "memory"})
    ClientsConfig(**{**shared, "identity": ["mtls", "peer"]})
    monkeypatch.setenv("BASTION_CLIENT_KEY_SECRET", "shared-by-replicas")
    ClientsConfig(**shared)
    # The same refusal from `bastion check-config`, naming the key path.
    monkeypatch.delenv("BASTION_CLIENT_KEY_SECRET")
    path = tmp_path / "bastion.yaml"
    path.write_text("clients:\n  backend: redis\n  identity: ['header:x-api-key']\n")
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "bastion", "check-config", str(path)],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "clients" in out.stderr + out.stdout
    assert "BASTION_CLIENT_KEY_SECRET" in out.stderr + out.stdout


def test_resolution_is_fast():
    import time
    cfg = config(identity=["header:x-api-key", "mtls", "peer"], trusted_proxies=["10.0.0.0/8"])
    ctx = FakeContext("ipv4:10.0.0.5:443", metadata=[("x-forwarded-for", "198.51.100.7"),
                                                     ("user-agent", "grpc-python")])
    resolve_identity(ctx, cfg)
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        resolve_identity(ctx, cfg)
    per_call = (time.perf_counter() - start) / n
    print(f"resolve_identity: {per_call * 1e6:.1f} us/call")
    assert per_call < 200e-6
