"""Domain mode TLS: a local CA that Cube generates, and a certificate for ``*.<domain>`` + ``api.<domain>``.

Files live in ``tls_dir`` (default ``<state_dir>/tls``): ``ca.pem`` (give it to clients as
``SSL_CERT_FILE``), ``ca.key`` and, per domain, ``<domain>-<hash>.pem`` (leaf + CA chain) and
``.key``. Keys are written 0600. The leaf is re-issued when it is missing, was not signed by the
current CA, or expires within 30 days. rustls (the SDK's TLS) rejects a wildcard directly under a
single-label name, so ``*.localhost`` fails while ``*.cube.localhost`` works.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cube_core import ConfigError

log = structlog.get_logger(__name__)

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=397)
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    cert: Path
    """The server certificate followed by the CA certificate (PEM)."""
    key: Path
    names: tuple[str, ...]


def server_names(domain_host: str) -> tuple[str, ...]:
    """``*.<domain>``, ``api.<domain>`` and ``<domain>``; refuses names rustls would not accept."""
    domain = domain_host.strip().lower().rstrip(".")
    if not domain or domain.startswith("*") or ":" in domain:
        raise ConfigError(f"domain {domain_host!r} is not a host name (give the port separately)")
    if "." not in domain:
        raise ConfigError(f"domain {domain!r} has one label; a wildcard under it is rejected by TLS clients "
                          f"(rustls): use e.g. 'cube.{domain}'")
    return (f"*.{domain}", f"api.{domain}", domain)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ensure_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    """Load the CA in ``directory``, creating it on first use."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey) and cert.not_valid_after_utc - _now() > RENEW_BEFORE:
            return cert, key, cert_path
        log.warning("re-creating the Cube CA (expiring or unreadable)", path=str(cert_path))
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Cube"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"Cube local CA ({socket.gethostname()})")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("created the Cube CA", path=str(cert_path))
    return cert, key, cert_path


def _leaf_ok(path: Path, ca: x509.Certificate, names: tuple[str, ...]) -> bool:
    try:
        leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
        leaf.verify_directly_issued_by(ca)
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, IndexError, x509.ExtensionNotFound, TypeError, Exception):
        return False
    return (set(sans.get_values_for_type(x509.DNSName)) == set(names)
            and leaf.not_valid_after_utc - _now() > RENEW_BEFORE)


def ensure_certificates(directory: Path, domain_host: str) -> TlsFiles:
    """The CA and a server certificate for ``domain_host``, created or renewed as needed."""
    names = server_names(domain_host)
    ca, ca_key, ca_path = ensure_ca(directory)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    cert_path = directory / f"{names[2]}-{digest}.pem"
    key_path = directory / f"{names[2]}-{digest}.key"
    if key_path.exists() and _leaf_ok(cert_path, ca, names):
        return TlsFiles(ca_cert=ca_path, cert=cert_path, key=key_path, names=names)
    key = _new_key()
    now = _now()
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[1])]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + LEAF_VALIDITY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    log.info("issued the domain certificate", names=list(names), path=str(cert_path))
    return TlsFiles(ca_cert=ca_path, cert=cert_path, key=key_path, names=names)
