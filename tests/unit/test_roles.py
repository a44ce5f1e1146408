"""The server role's password: stored by PostgreSQL as a SCRAM-SHA-256 verifier that
we compute, so the password itself never reaches the server or its logs."""

from __future__ import annotations

import base64
import hashlib
import hmac

from mdm_server.storage.roles import scram_sha256_verifier

# RFC 7677, section 3: user "user", password "pencil".
SALT = "W22ZaJ0SNY7soEsUEjb6gQ=="
NONCE = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
AUTH_MESSAGE = (f"n=user,r=rOprNGfwEbeRWgbNEkqO,r={NONCE},s={SALT},i=4096,"
                f"c=biws,r={NONCE}").encode()
CLIENT_PROOF = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
SERVER_SIGNATURE = "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def _parts(verifier: str) -> tuple[str, int, bytes, bytes, bytes]:
    mechanism, rest = verifier.split("$", 1)
    params, keys = rest.split("$")
    iterations, salt = params.split(":")
    stored, server = keys.split(":")
    return (mechanism, int(iterations), base64.b64decode(salt), base64.b64decode(stored),
            base64.b64decode(server))


def test_the_verifier_authenticates_the_rfc_7677_exchange() -> None:
    verifier = scram_sha256_verifier("pencil", salt=base64.b64decode(SALT))
    mechanism, iterations, salt, stored_key, server_key = _parts(verifier)
    assert (mechanism, iterations, salt) == ("SCRAM-SHA-256", 4096, base64.b64decode(SALT))
    # The server proves itself with ServerKey ...
    signature = hmac.new(server_key, AUTH_MESSAGE, hashlib.sha256).digest()
    assert base64.b64encode(signature).decode() == SERVER_SIGNATURE
    # ... and checks the client's proof against StoredKey.
    client_signature = hmac.new(stored_key, AUTH_MESSAGE, hashlib.sha256).digest()
    client_key = bytes(a ^ b for a, b in zip(base64.b64decode(CLIENT_PROOF), client_signature,
                                             strict=True))
    assert hashlib.sha256(client_key).digest() == stored_key


def test_each_verifier_has_its_own_salt() -> None:
    a, b = scram_sha256_verifier("same password here"), scram_sha256_verifier("same password here")
    assert _parts(a)[2] != _parts(b)[2] and len(_parts(a)[2]) == 16
    assert "same password" not in a
