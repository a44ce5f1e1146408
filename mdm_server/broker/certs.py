"""The broker's TLS certificates: a private CA, and a server certificate it signs.

    python3 mdm_server/broker/certs.py DIR [--host NAME]... [--owner UID:GID]
    python -m mdm_server.broker.certs DIR [--host NAME]... [--owner UID:GID]

``scripts/broker`` runs it before Mosquitto starts (unless given the operator's own
certificate); so can docker-compose's ``broker-init``. In DIR (made if missing):

- ``ca.crt``, ``ca.key``: a private CA (ECDSA P-256, valid 10 years), made on the
  first run and then kept: devices trust the broker through it (enrollment gives
  them ``ca.crt``), so it outlives the server certificates it signs.
- ``server.crt``, ``server.key``: the broker's certificate, signed by that CA, for
  127.0.0.1, ::1, localhost and every ``--host`` (a DNS name or an IP address).
  Kept as long as it covers every name asked for, is signed by ``ca.crt`` and has
  more than 30 days left; otherwise a new key and certificate are issued under the
  same CA (so devices need nothing new). It is valid 397 days: restart the broker
  (or run this again and send Mosquitto SIGHUP) within a year.

Private keys are written with mode 0600 (to a temporary file, then renamed), never
printed. ``--owner`` gives the server key and certificate to that user and group
(Mosquitto drops root before it reads them). What was made or kept is said on
stderr; nothing is printed on stdout.

Needs only the standard library and ``cryptography`` (a dependency of the server;
on Debian ``python3-cryptography``), so it runs as a plain file too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ALWAYS", "CertError", "ensure", "main", "parse_host", "sans_of"]

#: Names every server certificate covers, whatever else is asked for.
ALWAYS = ("127.0.0.1", "::1", "localhost")
CA_DAYS = 3650
SERVER_DAYS = 397  # clients that cap server certificates at 398 days accept it
RENEW_DAYS = 30
_DNS = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                  r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")

Name = x509.DNSName | x509.IPAddress


class CertError(Exception):
    """A name or a file is unusable; the message says which (never key material)."""


def parse_host(host: str) -> Name:
    """A subject alternative name for ``host``: an IP address or a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not _DNS.match(host):
        raise CertError(f"not a host name or IP address: {host!r}")
    return x509.DNSName(host.lower())


def sans_of(cert: x509.Certificate) -> set[Name]:
    """The DNS names and IP addresses a certificate is for."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names: set[Name] = set()
    for n in ext:
        if isinstance(n, x509.DNSName):
            names.add(x509.DNSName(n.value.lower()))
        elif isinstance(n, x509.IPAddress):
            names.add(n)
    return names


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` from the start, then rename it in place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        raise CertError(f"{path} is not a readable, unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path} is not an EC key (this tool makes P-256 keys)")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        raise CertError(f"{path} is not a readable PEM certificate") from None


def _new_ca(directory: Path, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey,
                                                        x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mdm-telemetry"),
        # Unique per CA: two brokers' CAs never look alike to a person or a client.
        x509.NameAttribute(NameOID.COMMON_NAME, f"MDM broker CA {secrets.token_hex(4)}"),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    # The key first: a ca.crt without its key would never be replaced.
    _write(directory / "ca.key", _key_pem(key), 0o600)
    _write(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return key, cert


def _new_server(directory: Path, names: list[Name], ca_key: ec.EllipticCurvePrivateKey,
                ca: x509.Certificate, now: dt.datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    first = names[0]
    cn = str(first.value)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(min(now + dt.timedelta(days=SERVER_DAYS), ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(directory / "server.key", _key_pem(key), 0o600)
    _write(directory / "server.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _server_problem(directory: Path, names: list[Name], ca: x509.Certificate,
                    now: dt.datetime) -> str | None:
    """Why the server certificate must be issued again, or None to keep it."""
    crt, key = directory / "server.crt", directory / "server.key"
    if not crt.exists() or not key.exists():
        return "none yet"
    try:
        cert = _load_cert(crt)
        priv = _load_key(key)
    except CertError as exc:
        return str(exc)
    if _spki(priv.public_key()) != _spki(cert.public_key()):
        return "server.key does not belong to server.crt"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "not signed by ca.crt"
    missing = set(names) - sans_of(cert)
    if missing:
        return "it does not cover " + ", ".join(sorted(str(n.value) for n in missing))
    if cert.not_valid_after_utc - now < dt.timedelta(days=RENEW_DAYS):
        return f"it expires on {cert.not_valid_after_utc:%Y-%m-%d}"
    return None


def ensure(directory: Path, hosts: Sequence[str] = (), *,
           owner: tuple[int, int] | None = None, now: dt.datetime | None = None) -> list[str]:
    """Make or keep the CA and the server certificate in ``directory`` (see the
    module's doc); returns what was done, one line each."""
    now = now or dt.datetime.now(dt.UTC)
    names: list[Name] = []
    for h in [*hosts, *ALWAYS]:
        n = parse_host(h)
        if n not in names:
            names.append(n)
    directory.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    ca_crt, ca_key_path = directory / "ca.crt", directory / "ca.key"
    if ca_crt.exists() and ca_key_path.exists():
        ca, ca_key = _load_cert(ca_crt), _load_key(ca_key_path)
        if _spki(ca_key.public_key()) != _spki(ca.public_key()):
            raise CertError(f"{ca_key_path} does not belong to {ca_crt}")
        notes.append(f"CA kept: {ca_crt}")
    elif ca_crt.exists():
        # Devices may trust this CA already: never replace it silently.
        raise CertError(f"{ca_crt} exists but {ca_key_path} does not: restore the key, or "
                        "remove both to make a new CA (every device must then be given "
                        "the new ca.crt)")
    else:
        ca_key, ca = _new_ca(directory, now)
        notes.append(f"CA made: {ca_crt}")
    why = _server_problem(directory, names, ca, now)
    if why is not None:
        _new_server(directory, names, ca_key, ca, now)
        notes.append(f"server certificate issued ({why}) for "
                     + ", ".join(str(n.value) for n in names))
    else:
        notes.append("server certificate kept")
    if owner is not None:
        for f in ("server.key", "server.crt", "ca.crt"):
            os.chown(directory / f, *owner)
    return notes


def _owner(value: str) -> tuple[int, int]:
    uid, sep, gid = value.partition(":")
    if not sep or not uid.isdigit() or not gid.isdigit():
        raise argparse.ArgumentTypeError("--owner must be UID:GID (numbers)")
    return int(uid), int(gid)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--host", action="append", default=[],
                   help="a DNS name or IP address devices use to reach the broker "
                        "(repeatable); 127.0.0.1, ::1 and localhost are always covered")
    p.add_argument("--owner", type=_owner, default=None, metavar="UID:GID",
                   help="owner of the server key and certificates (the broker's user)")
    args = p.parse_args(argv)
    try:
        for note in ensure(args.dir, args.host, owner=args.owner):
            print(f"broker TLS: {note}", file=sys.stderr)
    except (CertError, OSError) as exc:
        print(f"broker TLS: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
