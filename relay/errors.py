"""The error classes of the relay, defined once; README.md "Failure handling" has the table.

- transient (connection lost, lock wait, broker not available, request timeout): ``relay run``
  retries with the configured backoff; one-shot commands exit 3;
- operational (topic missing, not authorized, wrong password or CA, grants revoked): rows stay
  new (or wait behind a timed hold), capped backoff, metric and rate-limited log, not ready
  after N failed cycles, never exits; one-shot commands exit 3;
- poison (the row can never be published as it is): per ``RELAY_OUTBOX__ON_POISON``;
- misconfiguration at start-up: exit 78 naming the variable;
- missing schema or grants at start-up: exit 4 naming what is missing;
- bug (anything else): log with traceback, exit 1; usage (bad CLI arguments): exit 2.

:func:`classify` sorts an exception raised by a database or Kafka call; everything it does not
recognise is a bug.
"""

from __future__ import annotations

import enum

import aiokafka.errors
import pymysql.err


class ExitCode(enum.IntEnum):
    OK = 0
    BUG = 1
    USAGE = 2
    UNAVAILABLE = 3  # a dependency (database, Kafka) cannot be reached or refuses us for now
    MISSING = 4  # table, index, schema version or grant missing
    CONFIG = 78  # EX_CONFIG: a bad or unknown setting


class Kind(enum.Enum):
    TRANSIENT = "transient"
    OPERATIONAL = "operational"
    BUG = "bug"


class RelayError(Exception):
    """An expected failure with a one-line message and the exit code of a one-shot command."""

    exit_code = ExitCode.BUG


class ConfigError(RelayError):
    """Invalid settings; the message is one line and never contains a secret value."""

    exit_code = ExitCode.CONFIG


class UnavailableError(RelayError):
    """The database or Kafka cannot be reached, or refuses the relay for now."""

    exit_code = ExitCode.UNAVAILABLE


class MissingError(RelayError):
    """The schema (table, index, version) or a grant the relay needs is missing."""

    exit_code = ExitCode.MISSING


# MySQL/MariaDB error numbers that an operator must fix (the relay keeps trying meanwhile).
# 1044/1045 access denied, 1142/1143 table/column command denied, 1146 table missing,
# 1054 unknown column, 1227 privilege needed, 1370 routine denied.
MYSQL_OPERATIONAL = frozenset({1044, 1045, 1054, 1142, 1143, 1146, 1227, 1370})
# The statement's privilege is missing: at start-up, "missing grants" (exit 4).
MYSQL_DENIED = frozenset({1142, 1143, 1227, 1370})
# Passing by themselves: lock wait timeout, deadlock, read-only after a failover (1290, 1836),
# too many connections, server shutting down, query interrupted.
MYSQL_TRANSIENT = frozenset({1205, 1213, 1290, 1836, 1040, 1053, 1317, 2003, 2006, 2013})

KAFKA_OPERATIONAL: tuple[type[BaseException], ...] = (
    aiokafka.errors.TopicAuthorizationFailedError,
    aiokafka.errors.ClusterAuthorizationFailedError,
    aiokafka.errors.UnknownTopicOrPartitionError,
    aiokafka.errors.PolicyViolationError,
    aiokafka.errors.InvalidTimestampError,
    aiokafka.errors.InvalidRequiredAcksError,
    aiokafka.errors.UnsupportedVersionError,
)


def mysql_errno(exc: BaseException) -> int | None:
    if isinstance(exc, pymysql.err.MySQLError) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


def classify(exc: BaseException) -> Kind:  # noqa: PLR0911 - one return per class
    """Transient, operational or bug, for an exception out of a database or Kafka call."""
    errno = mysql_errno(exc)
    if errno is not None:
        if errno in MYSQL_OPERATIONAL:
            return Kind.OPERATIONAL
        if errno in MYSQL_TRANSIENT or isinstance(exc, pymysql.err.OperationalError):
            return Kind.TRANSIENT
        # ProgrammingError (syntax), IntegrityError, DataError...: our SQL is wrong
        return Kind.BUG
    if isinstance(exc, pymysql.err.InterfaceError):
        return Kind.TRANSIENT  # the connection is closed
    if isinstance(exc, KAFKA_OPERATIONAL):
        return Kind.OPERATIONAL
    if isinstance(exc, aiokafka.errors.KafkaError):
        return Kind.TRANSIENT
    if isinstance(exc, ConnectionError | TimeoutError | OSError):
        return Kind.TRANSIENT
    return Kind.BUG


def exit_code(exc: BaseException) -> int | None:
    """The exit code of a one-shot command that failed with ``exc``; None for a bug."""
    if isinstance(exc, RelayError):
        return exc.exit_code
    errno = mysql_errno(exc)
    if errno in MYSQL_DENIED or errno in {1146, 1054}:  # grant, table or column missing
        return ExitCode.MISSING
    if classify(exc) is Kind.BUG:
        return None
    return ExitCode.UNAVAILABLE


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, for logs and ``last_error``."""
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    if not text or text == name:
        return name
    return text if text.startswith(f"{name}:") else f"{name}: {text}"  # aiokafka names itself
