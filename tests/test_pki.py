"""`hdrlog pki`: a CA and certificates that verify, with safe file modes and clear errors."""

from __future__ import annotations

import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from hdrlog import pki
from tests.support import HDRLOG


def test_init_and_issue_verify_against_the_ca(tmp_path):
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "central", server=True, sans=["198.18.100.10", "hdrlog.example"])
    pki.issue(tmp_path, "web-01")
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    for name, server in (("central", True), ("web-01", False)):
        cert = x509.load_pem_x509_certificate((tmp_path / f"{name}.crt").read_bytes())
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert (ExtendedKeyUsageOID.SERVER_AUTH in eku) is server
        assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
        assert pki.identity_of((tmp_path / f"{name}.crt").read_bytes()) == name
        assert stat.S_IMODE((tmp_path / f"{name}.key").stat().st_mode) == 0o600
    sans = x509.load_pem_x509_certificate((tmp_path / "central.crt").read_bytes()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["central", "hdrlog.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["198.18.100.10"]
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600


def test_refuses_overwrite_bad_names_and_missing_ca(tmp_path):
    with pytest.raises(pki.PkiError, match="pki init --dir"):
        pki.issue(tmp_path, "web-01")
    pki.init_ca(tmp_path)
    with pytest.raises(pki.PkiError, match="exists; pass --force"):
        pki.init_ca(tmp_path)
    with pytest.raises(pki.PkiError, match="--name"):
        pki.issue(tmp_path, "../evil")
    with pytest.raises(pki.PkiError, match="--san"):
        pki.issue(tmp_path, "ok", sans=["not a name"])


def test_cli(tmp_path):
    run = lambda *a: subprocess.run([*HDRLOG, "pki", *a], capture_output=True, text=True, timeout=60)
    assert run("init", "--dir", str(tmp_path)).returncode == 0
    ok = run("issue", "--dir", str(tmp_path), "--name", "srv", "--server", "--san", "127.0.0.1")
    assert ok.returncode == 0 and "srv.crt" in ok.stdout
    again = run("issue", "--dir", str(tmp_path), "--name", "srv")
    assert again.returncode == 1 and again.stderr.strip().count("\n") == 0 and "--force" in again.stderr
