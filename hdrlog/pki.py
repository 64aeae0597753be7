"""A small PKI for mTLS: one CA, and certificates for the server and each collector host.

`hdrlog pki init --dir DIR` writes ca.key and ca.crt; `hdrlog pki issue --dir DIR
--name NAME [--server] [--san HOST_OR_IP ...]` writes NAME.key and NAME.crt signed
by that CA. A collector's identity is its certificate's name (the subject common
name, also its first DNS SAN): the server lets it write rows for that host only.
Keys are ECDSA P-256, written with mode 0600; nothing is overwritten without --force.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 397
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class PkiError(ValueError):
    """One line naming the file or value at fault."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write(path: Path, data: bytes, *, secret: bool, force: bool) -> None:
    if path.exists() and not force:
        raise PkiError(f"{path} exists; pass --force to replace it")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(directory: str | os.PathLike[str], *, name: str = "hdrlog CA", days: int = CA_DAYS,
            force: bool = False) -> tuple[Path, Path]:
    """Create DIR/ca.key and DIR/ca.crt."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(d / "ca.key", _key_pem(key), secret=True, force=force)
    _write(d / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), secret=False, force=force)
    return d / "ca.key", d / "ca.crt"


def _load_ca(d: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    except FileNotFoundError as exc:
        raise PkiError(f"{exc.filename} not found; run `hdrlog pki init --dir {d}` first") from None
    except ValueError as exc:
        raise PkiError(f"cannot read the CA in {d}: {exc}") from None
    return key, cert  # type: ignore[return-value]


def _san(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9*][A-Za-z0-9.*-]*", value):
            raise PkiError(f"--san {value!r}: expected a host name or an IP address") from None
        return x509.DNSName(value)


def issue(directory: str | os.PathLike[str], name: str, *, server: bool = False, sans: list[str] | None = None,
          days: int = LEAF_DAYS, force: bool = False,
          not_before: dt.datetime | None = None) -> tuple[Path, Path]:
    """Create DIR/NAME.key and DIR/NAME.crt signed by the CA in DIR.

    Every certificate may authenticate a client (collectors); ``server`` adds server
    authentication. The name is the first DNS SAN; ``sans`` adds more names or IPs.
    """
    if not NAME_RE.match(name):
        raise PkiError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most 63)")
    d = Path(directory)
    ca_key, ca_cert = _load_ca(d)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - dt.timedelta(minutes=5)
    names = [x509.DNSName(name)] + [_san(s) for s in (sans or []) if s != name]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                     crl_sign=False, content_commitment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(d / f"{name}.key", _key_pem(key), secret=True, force=force)
    _write(d / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM), secret=False, force=force)
    return d / f"{name}.key", d / f"{name}.crt"


def identity_of(cert_pem: bytes) -> str:
    """The identity a certificate proves: its common name."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""
