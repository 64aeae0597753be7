"""Channel credentials: mTLS from the configured files, or none with --insecure."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from hdrlog.collector.config import CollectorConfig

log = logging.getLogger("hdrlog.collector")


def channel_credentials(config: CollectorConfig) -> grpc.ChannelCredentials | None:
    if config.insecure:
        log.warning("--insecure: sending to %s without TLS or authentication", config.server)
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=Path(config.tls_ca).read_bytes(),
        private_key=Path(config.tls_key).read_bytes(),
        certificate_chain=Path(config.tls_cert).read_bytes(),
    )
