"""What counts as "the database is away" (retry; the API's 503) rather than a bad
operation, including the errors a Patroni failover shows (docs/scaling.md, "A
database that fails over")."""

from __future__ import annotations

import asyncpg
import pytest

from mdm_server.config import load_config
from mdm_server.ingest.sink import is_transient
from mdm_server.storage.pool import NoWritableHost, is_unavailable

FAILOVER_ERRORS = [
    ConnectionRefusedError(111, "Connect call failed"),
    ConnectionResetError(104, "Connection reset by peer"),
    NoWritableHost("no host of the database URL is writable now"),
    asyncpg.TargetServerAttributeNotMatched("None of the hosts match"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CrashShutdownError("terminating connection because of crash of another process"),
    asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
    asyncpg.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.InterfaceError("connection is closed"),
    TimeoutError(),
]

BAD_OPERATIONS = [
    asyncpg.UniqueViolationError("duplicate key"),
    asyncpg.UndefinedTableError("relation does not exist"),
    asyncpg.InvalidTextRepresentationError("invalid input syntax"),
    asyncpg.InsufficientPrivilegeError("permission denied"),
    asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    ValueError("a bug"),
]


@pytest.mark.parametrize("exc", FAILOVER_ERRORS, ids=lambda e: type(e).__name__)
def test_a_failover_s_errors_are_the_database_being_away(exc: BaseException) -> None:
    assert is_unavailable(exc)
    assert is_transient(exc)  # the ingest retries the batch


@pytest.mark.parametrize("exc", BAD_OPERATIONS, ids=lambda e: type(e).__name__)
def test_a_bad_operation_is_not_an_unavailable_database(exc: BaseException) -> None:
    assert not is_unavailable(exc)


def test_data_errors_are_never_retried() -> None:
    assert not is_transient(asyncpg.InvalidTextRepresentationError("invalid input syntax"))
    assert not is_transient(asyncpg.DataError("invalid input for query argument"))


def test_no_writable_host_is_an_oserror_every_reconnect_loop_waits_out() -> None:
    assert isinstance(NoWritableHost("x"), OSError)


def test_a_multi_host_database_url_is_kept_as_given() -> None:
    url = ("postgresql://mdm:pw@10.0.0.1:5432,10.0.0.2:5432/mdm"
           "?target_session_attrs=read-write")
    assert load_config({"MDM_DATABASE_URL": url}).database_url == url
