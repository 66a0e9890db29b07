"""The node's egress CA: the certificate authority the egress proxy signs a rule host's
certificate with when it inspects a sandbox's HTTPS to that host (:mod:`.httpproxy`).

- Made once per node (EC P-256): ``ca.key`` (0600) and ``ca.pem`` in ``ca_dir``, reused across
  restarts so paused and running sandboxes keep trusting it. Processes that start at once agree
  on one CA (each file is published with ``link``, which fails if it is there already).
- The key never leaves the host: guests get ``ca.pem`` only (the node sends it when it makes a
  sandbox ready), and trust it for every name, so whoever holds the key can impersonate any
  server to this node's guests (docs/security.md).
- Leaf certificates are minted on demand for one DNS name each (the proxy asks only for names of
  the sandbox's own rules), valid :data:`LEAF_VALID` and cached (:data:`CACHE_SIZE` names, least
  recently used dropped, re-minted when half their validity is gone). One leaf key per process.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
import ssl
import tempfile
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALID = datetime.timedelta(days=3650)
LEAF_VALID = datetime.timedelta(days=2)
BACKDATE = datetime.timedelta(hours=1)
"""Leaves start an hour early: a guest clock slightly behind still accepts them."""
CACHE_SIZE = 256
ALPN = ["http/1.1"]
"""Offered to the guest: the proxy's rule path speaks HTTP/1.1 only."""


class EgressCa:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert
        self.pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        self._contexts: collections.OrderedDict[str, tuple[ssl.SSLContext, datetime.datetime]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()
        self.minted = 0
        """Leaf certificates made by this process (tests read it)."""

    @classmethod
    def load_or_create(cls, ca_dir: Path, common_name: str = "Cube egress CA") -> EgressCa:
        ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path, cert_path = ca_dir / "ca.key", ca_dir / "ca.pem"
        # each file is published whole and only if absent; everyone then reads the files, so
        # processes racing here end up with the same pair
        if not key_path.exists():
            _publish(key_path, ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()), 0o600)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: not an EC private key")
        if not cert_path.exists():
            _publish(cert_path, _ca_cert(key, common_name).public_bytes(serialization.Encoding.PEM), 0o644)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if cert.public_key() != key.public_key():
            raise ValueError(f"{cert_path} is not the certificate of {key_path}")
        return cls(key, cert)

    def server_context(self, name: str) -> ssl.SSLContext:
        """A TLS server context presenting a leaf for ``name`` (minted or cached), offering
        HTTP/1.1 only."""
        now = datetime.datetime.now(datetime.UTC)
        with self._lock:
            hit = self._contexts.get(name)
            if hit is not None and hit[1] > now:
                self._contexts.move_to_end(name)
                return hit[0]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(ALPN)
        leaf = self._leaf(name, now)
        # ssl loads a chain from a file only: a private file, gone once loaded
        with tempfile.NamedTemporaryFile("wb", prefix="cube-leaf-") as fh:
            fh.write(leaf.public_bytes(serialization.Encoding.PEM) + self.pem.encode() + self._leaf_key_pem)
            fh.flush()
            ctx.load_cert_chain(fh.name)
        with self._lock:
            self._contexts[name] = (ctx, now + LEAF_VALID / 2)
            self._contexts.move_to_end(name)
            while len(self._contexts) > CACHE_SIZE:
                self._contexts.popitem(last=False)
            self.minted += 1
        return ctx

    def _leaf(self, name: str, now: datetime.datetime) -> x509.Certificate:
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
                .issuer_name(self.cert.subject)
                .public_key(self._leaf_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE)
                .not_valid_after(now + LEAF_VALID)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=False, crl_sign=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._leaf_key.public_key()),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                               critical=False)
                .sign(self.key, hashes.SHA256()))


def _ca_cert(key: ec.EllipticCurvePrivateKey, common_name: str) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Cube"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + CA_VALID)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


def _publish(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole with ``mode``, unless it exists already (another process won)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
