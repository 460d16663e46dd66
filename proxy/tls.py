"""TLS on the gRPC front (server certificate, mTLS, hot reload) and to the model server.

Front: ``tls.server.cert_file``/``key_file`` turn TLS on; ``client_ca_file`` with
``require_client_cert: true`` makes it mTLS (a client without a certificate chaining to that CA is
refused during the handshake, and the verified subject is what the ``mtls`` identity source
reads). The server uses gRPC's dynamic certificate configuration: every new connection asks
:meth:`CertificateWatcher.fetch` whether a newer configuration exists, so replaced files take
effect for new connections without a restart, while established connections keep theirs.

The files are polled like the config file (``proxy/reload.py``): ``stat()`` of each path (which
follows links, so a Kubernetes Secret's ``..data`` symlink swap is seen) every
``reload_interval_s``; a change is validated (the key must match the certificate, the CA must
parse) before it is offered to gRPC, so a half-written or mismatched pair is logged and the
running certificate keeps serving until the files are consistent again.

Upstream: ``tls.upstream`` makes the channel to the model server a TLS channel, checked against
``ca_file`` (or the system roots), optionally presenting a client certificate (mTLS), with
``server_name`` overriding the name checked in the upstream's certificate. Upstream credentials
are read at start-up (a restart picks up new ones).
"""
from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading

import grpc

from bastion.proxy.tasks import cancel_and_wait

log = logging.getLogger("bastion.tls")


class TLSError(ValueError):
    """A TLS file that cannot be used; the message names the config key and the file."""


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise TLSError(f"{key}: cannot read {path}: {err.strerror}") from None
    if not data.strip():
        raise TLSError(f"{key}: {path} is empty")
    return data


def _fingerprint(path: str | None) -> tuple | None:
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return ("missing",)
    return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size, os.path.realpath(path))


def _check_pair(cert_file: str, key_file: str, key: str) -> None:
    """The key must be a PEM private key matching the certificate (checked by OpenSSL)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A password callback that returns nothing: an encrypted key fails instead of prompting.
        context.load_cert_chain(cert_file, key_file, password=lambda: b"")
    except (ssl.SSLError, OSError) as err:
        raise TLSError(f"{key}.cert_file/key_file: {cert_file} and {key_file} are not a matching "
                       f"PEM certificate and unencrypted private key ({err})") from None


def _check_ca(ca_file: str, key: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as err:
        raise TLSError(f"{key}: {ca_file} is not a PEM CA bundle ({err})") from None


class CertificateWatcher:
    """Holds the front's certificate configuration and offers a newer one when files change."""

    def __init__(self, config, key: str = "tls.server"):
        self.config = config
        self.key = key
        self.reloads = 0
        self.failures = 0
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._task: asyncio.Task | None = None
        self._seen = self._fingerprints()
        loaded = self._load()
        if loaded is None:
            raise TLSError(f"{key}: the certificate files changed while being read; try again")
        self.current = loaded

    @property
    def _paths(self) -> tuple[str | None, ...]:
        return (self.config.cert_file, self.config.key_file, self.config.client_ca_file)

    def _fingerprints(self) -> tuple:
        return tuple(_fingerprint(path) for path in self._paths)

    def _load(self) -> grpc.ServerCertificateConfiguration | None:
        """Read and validate the files; None if they changed while being read. Raises TLSError."""
        cfg = self.config
        before = self._fingerprints()
        cert = _read(cfg.cert_file, f"{self.key}.cert_file")
        key = _read(cfg.key_file, f"{self.key}.key_file")
        _check_pair(cfg.cert_file, cfg.key_file, self.key)
        client_ca = None
        if cfg.client_ca_file:
            client_ca = _read(cfg.client_ca_file, f"{self.key}.client_ca_file")
            _check_ca(cfg.client_ca_file, f"{self.key}.client_ca_file")
        if self._fingerprints() != before:
            return None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before every new connection's handshake: a new configuration once,
        else None (keep the current one). Must stay cheap and must not raise."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def poll(self) -> bool:
        """Reload if any file changed since the last look; True when a new configuration was
        loaded (it applies to connections accepted from now on)."""
        current = self._fingerprints()
        if current == self._seen:
            return False
        try:
            loaded = self._load()
        except TLSError as err:
            # Remember this state, so the error is logged once per change, not every poll; the
            # next change to any of the files is tried again.
            self._seen = current
            self.failures += 1
            log.error("TLS certificate reload rejected, keeping the running certificate: %s", err)
            return False
        if loaded is None:
            return False  # files are being written: look again at the next poll
        self._seen = current
        with self._lock:
            self._pending = loaded
            self.current = loaded
        self.reloads += 1
        log.info("TLS certificate files changed: new connections use the new certificate")
        return True

    async def _watch(self) -> None:
        interval = self.config.reload_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the watcher must outlive any surprise
                log.exception("TLS certificate poll failed")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())
        _WATCHERS.add(self)

    async def stop(self) -> None:
        _WATCHERS.discard(self)
        await cancel_and_wait(self._task)


# Running watchers (a strong reference keeps each polling task alive for the server's life; the
# event loop cancels the task when it ends).
_WATCHERS: set[CertificateWatcher] = set()


def server_credentials(config) -> tuple[grpc.ServerCredentials, CertificateWatcher]:
    """Dynamic TLS credentials for ``tls.server`` and the watcher that feeds them."""
    watcher = CertificateWatcher(config)
    credentials = grpc.dynamic_ssl_server_credentials(
        watcher.current, watcher.fetch,
        require_client_authentication=bool(config.require_client_cert))
    return credentials, watcher


def add_port(server: grpc.aio.Server, config) -> int:
    """Bind ``config.listen`` on ``server``: TLS (and mTLS) when ``config.tls.server`` has a
    certificate, plaintext otherwise. Returns the port (0 when binding failed). With TLS, starts
    the certificate watcher; call it from a running event loop."""
    tls = config.tls.server
    if not tls.enabled:
        return server.add_insecure_port(config.listen)
    credentials, watcher = server_credentials(tls)
    port = server.add_secure_port(config.listen, credentials)
    if port:
        watcher.start()
        log.info("TLS on %s (%s), certificate files polled every %.1fs", config.listen,
                 "client certificates required" if tls.require_client_cert else "server only",
                 tls.reload_interval_s)
    return port


def channel_credentials(tls) -> grpc.ChannelCredentials:
    root = _read(tls.ca_file, "tls.upstream.ca_file") if tls.ca_file else None
    if tls.ca_file:
        _check_ca(tls.ca_file, "tls.upstream.ca_file")
    key = cert = None
    if tls.cert_file:
        _check_pair(tls.cert_file, tls.key_file, "tls.upstream")
        cert = _read(tls.cert_file, "tls.upstream.cert_file")
        key = _read(tls.key_file, "tls.upstream.key_file")
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key,
                                        certificate_chain=cert)


def upstream_channel(target: str, options: list[tuple], tls=None) -> grpc.aio.Channel:
    """The channel to the model server: TLS when ``tls`` (a ``TLSUpstreamConfig``) is active."""
    if tls is None or not tls.active:
        return grpc.aio.insecure_channel(target, options=options)
    options = list(options)
    if tls.server_name:
        options += [("grpc.ssl_target_name_override", tls.server_name),
                    ("grpc.default_authority", tls.server_name)]
    return grpc.aio.secure_channel(target, channel_credentials(tls), options=options)
