"""Channel credentials: mTLS from the configured files, or none with --insecure."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from hdrlog.collector.config import CollectorConfig

log = logging.getLogger("hdrlog.collector")


def channel_credentials(config: CollectorConfig) -> grpc.ChannelCredentials | None:
    if config.insecure:
        log.warning("--insecure: sending to %s without TLS or authentication", ", ".join(config.server))
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=Path(config.tls_ca).read_bytes(),
        private_key=Path(config.tls_key).read_bytes(),
        certificate_chain=Path(config.tls_cert).read_bytes(),
    )


def check_server(config: CollectorConfig, timeout: float = 3.0) -> str:
    """check_address() for every configured server; the first problem found ('' when none)."""
    for address in config.server:
        problem = check_address(config, address, timeout)
        if problem:
            return problem
    return ""


def check_address(config: CollectorConfig, address: str, timeout: float = 3.0) -> str:
    """One TLS handshake with the server as gRPC will make it; '' when it verifies or the server is not
    reachable (yet), else one sentence saying what is wrong: a name the server's certificate does not cover
    (naming the names it does), or a certificate our CA did not sign. gRPC itself only says UNAVAILABLE."""
    import socket
    import ssl

    from cryptography import x509

    from hdrlog.config import parse_hostport
    from hdrlog.pki import names_of

    if config.insecure:
        return ""
    host, port = parse_hostport("server", address)  # type: ignore[misc]
    ctx = ssl.create_default_context(cafile=config.tls_ca)
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with ctx.wrap_socket(sock, server_hostname=host):
                return ""
    except ssl.SSLCertVerificationError as exc:
        problem = exc.verify_message or str(exc)
    except (OSError, ssl.SSLError):
        return ""  # not up yet, or it refused us: the sender retries and says so
    # Read the certificate it presents, without trusting it, to name what is wrong.
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname, bare.verify_mode = False, ssl.CERT_NONE
    bare.load_cert_chain(config.tls_cert, config.tls_key)
    bare.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with bare.wrap_socket(sock, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return f"the server {address} presents a certificate that does not verify: {problem}"
    cert = x509.load_der_x509_certificate(der)
    names = names_of(cert)
    if "mismatch" in problem.lower() or "hostname" in problem.lower():
        return (f"the server {address} presents a certificate for {', '.join(names) or 'no names'}, not "
                f"{host!r}: reissue it with `hdrlog pki issue --server --san {host}` or use one of those names")
    return (f"the server {address} presents a certificate ({cert.subject.rfc4514_string()}, issued by "
            f"{cert.issuer.rfc4514_string()}) that tls_ca {config.tls_ca} does not verify: {problem}")
