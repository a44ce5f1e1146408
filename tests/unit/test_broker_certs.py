"""The broker's TLS certificates (mdm_server/broker/certs.py): made once, kept, renewed
under the same CA; keys private. tests/integration/test_tls.py connects through them."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from mdm_server.broker import certs

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "mdm_server" / "broker" / "certs.py"


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _names(path: Path) -> set[str]:
    return {str(n.value) for n in certs.sans_of(_cert(path))}


def test_first_run_makes_a_ca_and_a_server_certificate_for_the_names(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    # As scripts/broker runs it: the file on its own.
    out = subprocess.run([sys.executable, str(SCRIPT), str(d), "--host", "mdm.example.org",
                          "--host", "192.0.2.10"], capture_output=True, text=True, check=True)
    assert out.stdout == ""  # nothing on stdout, key material least of all
    assert "CA made" in out.stderr and "server certificate issued" in out.stderr
    for key in ("ca.key", "server.key"):
        assert (d / key).stat().st_mode & 0o777 == 0o600
        assert "PRIVATE KEY" not in out.stderr
    assert _names(d / "server.crt") == {"mdm.example.org", "192.0.2.10", "127.0.0.1", "::1",
                                        "localhost"}
    # A TLS client that trusts only ca.crt accepts the server for each name, and
    # refuses it for a name it was not made for.
    for name in ("mdm.example.org", "192.0.2.10", "127.0.0.1", "localhost"):
        _handshake(d, name)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(d, "other.example.org")


def _handshake(d: Path, hostname: str) -> None:
    """A TLS handshake in memory: a client trusting only d/ca.crt, checking
    ``hostname``, against a server with d/server.crt and d/server.key."""
    client = ssl.create_default_context(cafile=str(d / "ca.crt"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(d / "server.crt"), str(d / "server.key"))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        done = 0
        for side in (c, s):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done == 2:
            return
    raise AssertionError("handshake did not finish")


def test_a_second_run_keeps_everything(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    certs.ensure(d, ["mdm.example.org"])
    before = {f: (d / f).read_bytes() for f in ("ca.crt", "ca.key", "server.crt", "server.key")}
    notes = certs.ensure(d, ["mdm.example.org"])
    assert notes == [f"CA kept: {d / 'ca.crt'}", "server certificate kept"]
    assert {f: (d / f).read_bytes() for f in before} == before


def test_a_new_name_reissues_the_server_certificate_under_the_same_ca(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    certs.ensure(d, ["old.example.org"])
    ca, old_key = (d / "ca.crt").read_bytes(), (d / "server.key").read_bytes()
    notes = certs.ensure(d, ["new.example.org"])
    assert "does not cover new.example.org" in notes[1]
    assert (d / "ca.crt").read_bytes() == ca  # devices that pinned the CA need nothing new
    assert (d / "server.key").read_bytes() != old_key
    assert "new.example.org" in _names(d / "server.crt")
    _cert(d / "server.crt").verify_directly_issued_by(_cert(d / "ca.crt"))


def test_a_certificate_near_its_end_is_renewed(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    now = dt.datetime.now(dt.UTC)
    certs.ensure(d, [], now=now)
    end = _cert(d / "server.crt").not_valid_after_utc
    assert end - now > dt.timedelta(days=certs.SERVER_DAYS - 1)
    assert certs.ensure(d, [], now=end - dt.timedelta(days=certs.RENEW_DAYS + 1))[1] == \
        "server certificate kept"
    later = end - dt.timedelta(days=certs.RENEW_DAYS - 1)
    notes = certs.ensure(d, [], now=later)
    assert "expires on" in notes[1]
    assert _cert(d / "server.crt").not_valid_after_utc > end


def test_a_certificate_not_signed_by_the_ca_is_replaced(tmp_path: Path) -> None:
    d, other = tmp_path / "tls", tmp_path / "other"
    certs.ensure(d, [])
    certs.ensure(other, [])
    for f in ("server.crt", "server.key"):
        (d / f).write_bytes((other / f).read_bytes())
    assert "not signed by ca.crt" in certs.ensure(d, [])[1]
    _cert(d / "server.crt").verify_directly_issued_by(_cert(d / "ca.crt"))


def test_a_ca_without_its_key_is_never_replaced_silently(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    certs.ensure(d, [])
    ca = (d / "ca.crt").read_bytes()
    (d / "ca.key").unlink()
    with pytest.raises(certs.CertError, match="restore the key"):
        certs.ensure(d, [])
    assert (d / "ca.crt").read_bytes() == ca


@pytest.mark.parametrize("bad", ["not a host", "-x.example.org", "a/b", ""])
def test_bad_names_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(certs.CertError, match="not a host name"):
        certs.ensure(tmp_path / "tls", [bad])


def test_ip_addresses_become_ip_names(tmp_path: Path) -> None:
    certs.ensure(tmp_path / "tls", ["[2001:db8::1]"])
    ips = {n.value for n in certs.sans_of(_cert(tmp_path / "tls" / "server.crt"))
           if isinstance(n, x509.IPAddress)}
    assert ipaddress.ip_address("2001:db8::1") in ips


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_owner_gets_the_server_key(tmp_path: Path) -> None:
    certs.ensure(tmp_path / "tls", [], owner=(1883, 1883))
    st = (tmp_path / "tls" / "server.key").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1883, 1883, 0o600)
    assert (tmp_path / "tls" / "ca.key").stat().st_uid == os.geteuid()
