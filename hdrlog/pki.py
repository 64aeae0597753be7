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
from cryptography.exceptions import InvalidSignature
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


class TlsFileError(ValueError):
    """A TLS file that cannot work; ``key`` names the config key (tls_cert, tls_key, tls_ca)."""

    def __init__(self, key: str, path: str, reason: str):
        super().__init__(reason)
        self.key, self.path = key, path


def check_tls_files(cert_path: str, key_path: str, ca_path: str, *, now: dt.datetime | None = None) -> x509.Certificate:
    """Catch at start what would otherwise be a vague handshake failure later: files that are not PEM,
    a key that is not the certificate's, a certificate expired or not yet valid, or one the CA did not sign.
    Returns the certificate."""
    now = now or _now()

    def load_cert(key: str, path: str) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(Path(path).read_bytes())
        except OSError as exc:
            raise TlsFileError(key, path, f"cannot read it: {exc.strerror}") from None
        except ValueError:
            raise TlsFileError(key, path, "not a PEM certificate") from None

    cert, ca = load_cert("tls_cert", cert_path), load_cert("tls_ca", ca_path)
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except OSError as exc:
        raise TlsFileError("tls_key", key_path, f"cannot read it: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise TlsFileError("tls_key", key_path, "not an unencrypted PEM private key") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise TlsFileError("tls_key", key_path, f"is not the private key of the certificate {cert_path} "
                                                f"({_subject(cert)}): give the key issued with it")
    for which, c, path in (("tls_cert", cert, cert_path), ("tls_ca", ca, ca_path)):
        if c.not_valid_after_utc < now:
            raise TlsFileError(which, path, f"certificate {_subject(c)} expired on "
                                            f"{c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: issue a new one")
        if c.not_valid_before_utc > now:
            raise TlsFileError(which, path, f"certificate {_subject(c)} is not valid before "
                                            f"{c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (is this clock right?)")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise TlsFileError("tls_ca", ca_path, f"did not sign the certificate {cert_path} ({_subject(cert)}, issued "
                                              f"by {cert.issuer.rfc4514_string()!r}, this CA is "
                                              f"{ca.subject.rfc4514_string()!r}): give the CA that issued it") from None
    return cert


def _subject(cert: x509.Certificate) -> str:
    return repr(identity_of(cert.public_bytes(serialization.Encoding.PEM)) or cert.subject.rfc4514_string())


def names_of(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a server certificate is valid for."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(a) for a in san.get_values_for_type(x509.IPAddress))]
