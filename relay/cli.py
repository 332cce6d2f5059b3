"""The ``relay`` command line. Settings are built here, once, from the environment, and passed
down. Expected failures print one line and exit with the code of the error table
(README.md, "Failure handling"): 3 dependency unreachable, 4 schema or grants missing,
78 bad setting; 2 is a usage error; 1 a bug (with its traceback)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from relay import __version__, config, errors, logs, queries

DOCS = "Settings: RELAY_* environment variables, all listed in README.md (section Settings)."
ABOUT = (
    """\
Relay committed MySQL/MariaDB outbox rows to Kafka: at least once, in order per aggregate,
scaling out over replicas with SELECT ... FOR UPDATE SKIP LOCKED.

Exit codes: 0 ok, 1 bug, 2 usage, 3 database or Kafka unreachable, 4 schema or grants missing,
78 bad setting. """
    + DOCS
)


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


async def _run(settings: config.Settings, _: argparse.Namespace) -> int:
    from relay import app  # noqa: PLC0415 - keep `relay schema` free of heavy imports

    return await app.App(settings).run()


async def _migrate(settings: config.Settings, _: argparse.Namespace) -> int:
    from relay import db, store  # noqa: PLC0415

    async with db.connection(settings) as conn:
        steps = await store.Store(settings.outbox.table).migrate(conn)
    done = f"upgraded ({', '.join(steps)})" if steps else "current"
    print(
        f"schema version {store.SCHEMA_VERSION} {done}: {settings.db.name}.{settings.outbox.table}"
    )
    return 0


async def _check(settings: config.Settings, _: argparse.Namespace) -> int:
    from relay import preflight  # noqa: PLC0415

    results = await preflight.run(settings)
    for result in results:
        mark = "FAIL" if not result.ok else "warn" if result.warn else "ok  "
        print(f"{mark} {result.name}: {result.detail}")
    return max((r.exit_code for r in results), default=0)


async def _replay(settings: config.Settings, args: argparse.Namespace) -> int:
    from relay import triage  # noqa: PLC0415

    outcome = await triage.replay(settings, args.id, args.limit)
    for note in outcome.notes:
        print(note)
    print(f"rows put back to new: {outcome.changed}; holds released: {outcome.released}")
    return 0


async def _skip(settings: config.Settings, args: argparse.Namespace) -> int:
    from relay import triage  # noqa: PLC0415

    outcome = triage.Outcome()
    if args.id:
        outcome = await triage.skip(settings, args.id, args.by or triage.operator_name())
    if args.aggregate:
        released = await triage.release(settings, args.aggregate)
        outcome.released += released.released
        outcome.notes += released.notes
    for note in outcome.notes:
        print(note)
    print(f"rows skipped: {outcome.changed}; holds released: {outcome.released}")
    return 0


async def _failed(settings: config.Settings, args: argparse.Namespace) -> int:
    from relay import triage  # noqa: PLC0415

    report = await triage.report(settings, args.limit)
    print(triage.render_json(report) if args.json else triage.render_table(report))
    return 0


def _aggregate(text: str) -> tuple[str, str]:
    aggregate_type, sep, aggregate_id = text.partition(":")
    if not sep or not aggregate_type:
        raise argparse.ArgumentTypeError("expected TYPE:ID (the aggregate_type, a colon, the id)")
    return aggregate_type, aggregate_id


async def _demo(settings: config.Settings, args: argparse.Namespace) -> int:
    from relay import tools  # noqa: PLC0415 - only `relay demo` and `relay bench` load the tools

    return await tools.run("demo", settings, args)


async def _bench(settings: config.Settings, args: argparse.Namespace) -> int:
    from relay import tools  # noqa: PLC0415 - only `relay demo` and `relay bench` load the tools

    return await tools.run("bench", settings, args)


def _tool_arguments(demo: argparse.ArgumentParser, bench: argparse.ArgumentParser) -> None:
    """Options of ``relay demo`` and ``relay bench`` (here: --help must not import the tools)."""
    from pathlib import Path  # noqa: PLC0415

    def events_range(text: str) -> tuple[int, int]:
        low, sep, high = text.partition("-")
        try:
            bounds = (int(low), int(high) if sep else int(low))
        except ValueError:
            raise argparse.ArgumentTypeError("expected N or LOW-HIGH, e.g. 1-3") from None
        if not 1 <= bounds[0] <= bounds[1]:
            raise argparse.ArgumentTypeError("need 1 <= LOW <= HIGH")
        return bounds

    def positive(text: str) -> float:
        value = float(text)
        if not value > 0:
            raise argparse.ArgumentTypeError("must be positive")
        return value

    def above_one(text: str) -> float:
        value = float(text)
        if not value > 1:
            raise argparse.ArgumentTypeError("must be above 1")
        return value

    def count(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError("must be at least 1")
        return value

    for p in (demo, bench):
        p.add_argument("--aggregates", type=int, default=1000, help="distinct aggregate ids")
        p.add_argument("--writers", type=int, default=16, help="Service A connections")
        p.add_argument("--event-bytes", type=int, default=1024, help="size of `after` JSON")
        p.add_argument(
            "--events-per-txn",
            type=events_range,
            default=(1, 3),
            metavar="LOW-HIGH",
            help="outbox events per transaction, uniform (default 1-3)",
        )
        p.add_argument("--partitions", type=int, default=6, help="partitions of fresh topics")
        p.add_argument("--keep", action="store_true", help="keep the topic (and bench database)")
    demo.add_argument(
        "--rate", type=positive, default=500.0, help="committed events/s (default 500)"
    )
    demo.add_argument("--duration", type=float, default=None, help="seconds (default: Ctrl-C)")
    demo.add_argument(
        "--relay-db-user",
        metavar="USER",
        help="run the relay as this existing database user, granted README's daemon grants on "
        "the outbox tables by the demo (the set-up and Service A stay RELAY_DB__USER); "
        "default: RELAY_DB__USER for everything",
    )
    demo.add_argument(
        "--relay-db-password", default="", metavar="PASSWORD", help="its password (dev only)"
    )
    bench.add_argument(
        "--mode", choices=("rate", "capacity", "drain", "raw", "all"), default="rate"
    )
    bench.add_argument(
        "--writer",
        choices=("sql", "helper"),
        default="sql",
        help="Service A: sql = a literal INSERT, no wake-up (default); "
        "helper = relay.writer with wake-up datagrams",
    )
    bench.add_argument(
        "--rate",
        type=positive,
        default=500.0,
        help="Service A transactions/s (txn/s, not events/s; default 500); "
        "capacity: the first step",
    )
    bench.add_argument(
        "--duration",
        type=positive,
        default=None,
        help="seconds of load: rate mode (default 60); capacity: per step (default 20)",
    )
    bench.add_argument(
        "--max-rate",
        type=positive,
        default=20_000.0,
        help="capacity: highest rate tried, txn/s (default 20000)",
    )
    bench.add_argument(
        "--writer-processes",
        type=count,
        default=1,
        help="rate, capacity: Service A's writers spread over this many processes (one Python "
        "process writes at most ~1,300 txn/s on a 2-core machine; default 1)",
    )
    bench.add_argument(
        "--max-steps", type=count, default=12, help="capacity: at most this many steps"
    )
    bench.add_argument(
        "--step-factor",
        type=above_one,
        default=1.5,
        help="capacity: rate multiplier while steps pass (default 1.5), then bisection",
    )
    bench.add_argument("--rows", type=int, default=1_000_000, help="drain/raw: events")
    bench.add_argument(
        "--retained-published", type=int, default=0, help="preload N rows already published"
    )
    bench.add_argument(
        "--drain-timeout", type=float, default=600.0, help="drain: give up after seconds"
    )
    bench.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU window")
    bench.add_argument(
        "--progress-interval",
        type=positive,
        default=1.0,
        help="seconds between live progress lines on stderr (default 1)",
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    bench.add_argument(
        "--relay-log", type=Path, default=None, help="relay process output (default: discard)"
    )


def _command(
    sub: Any, name: str, func: Any, summary: str, description: str
) -> argparse.ArgumentParser:
    command: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=f"{description}\n\n{DOCS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.set_defaults(func=func)
    return command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relay", description=ABOUT, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _command(
        sub,
        "run",
        _run,
        "run the relay daemon",
        "Run the daemon: claim new outbox rows, publish them to Kafka, mark them published; clean\n"
        "old rows; serve /metrics, /livez, /readyz. Checks the schema version and grants first\n"
        "(exit 4 naming what is missing). Stops on SIGTERM/SIGINT (exit 0). Reads every\n"
        "RELAY_* group: DB, KAFKA, OUTBOX, WORKER, CLEANER, HTTP, BACKLOG, WAKEUP, LOG.",
    )
    _command(
        sub,
        "migrate",
        _migrate,
        "create or upgrade the outbox tables (idempotent)",
        "Create the outbox tables if missing, upgrade an existing schema in place, and record the\n"
        "schema version. Safe to run again. Reads RELAY_DB__* and RELAY_OUTBOX__TABLE.",
    )
    _command(
        sub,
        "schema",
        None,
        "print the outbox schema SQL",
        "Print the SQL that `relay migrate` runs on a fresh database. Reads RELAY_OUTBOX__TABLE.",
    )
    _command(
        sub,
        "check",
        _check,
        "pre-flight checks; exit 3 or 4 on a failure",
        "Check the database connection, schema version, indexes and grants (each statement the\n"
        "relay runs, rolled back), Kafka, and that the topics of new rows and the dead-letter\n"
        "topic exist. One line per check on stdout. Exit 4 if the schema or a grant is\n"
        "missing, else 3 if the database, Kafka or a topic is not there.\n"
        "Reads RELAY_DB__*, RELAY_KAFKA__* and RELAY_OUTBOX__*.",
    )
    _command(
        sub,
        "failed",
        _failed,
        "list failed rows and held aggregates",
        "List rows in status failed and the aggregates held behind them (or behind a timed\n"
        "hold after an operational error), as a table or JSON. Reads RELAY_DB__*, RELAY_OUTBOX__*.",
    )
    failed = sub.choices["failed"]
    failed.add_argument("--json", action="store_true", help="JSON instead of a table")
    failed.add_argument("--limit", type=int, default=1000, help="at most this many of each")
    replay = _command(
        sub,
        "replay",
        _replay,
        "put failed rows back to new; releases their holds",
        "Put failed rows (after you fixed them) back to new and release the hold of their\n"
        "aggregate: Kafka gets the row, then the aggregate's later rows, in order. Waits for the\n"
        "worker owning the shard to finish its cycle. Reads RELAY_DB__*, RELAY_OUTBOX__*, and\n"
        "RELAY_WORKER__PUBLISH_TIMEOUT_S / LOCK_WAIT_TIMEOUT_S (how long to wait for a shard).",
    )
    replay.add_argument("--id", type=int, action="append", help="only this row id (repeatable)")
    replay.add_argument("--limit", type=int, default=1_000_000, help="at most this many rows")
    skip = _command(
        sub,
        "skip",
        _skip,
        "give up on failed rows, or release a hold",
        "Give up on failed rows (status skipped; who and when recorded) and release their\n"
        "aggregates' holds, so the later rows are published; or release the hold of an\n"
        "aggregate whose failed row is gone. Reads RELAY_DB__*, RELAY_OUTBOX__*.",
    )
    skip.add_argument("--id", type=int, action="append", help="a failed row id (repeatable)")
    skip.add_argument(
        "--aggregate",
        type=_aggregate,
        action="append",
        metavar="TYPE:ID",
        help="release the hold of this aggregate, e.g. when its failed row was deleted",
    )
    skip.add_argument("--by", help="who skips (default: user@host)")
    demo = sub.add_parser("demo", help="relay + simulated Service A and B with live figures")
    demo.set_defaults(func=_demo)
    bench_p = sub.add_parser("bench", help="measure latency and throughput against real servers")
    bench_p.set_defaults(func=_bench)
    _tool_arguments(demo, bench_p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)  # a usage error exits 2
    try:
        settings = config.load()
    except errors.ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return errors.ExitCode.CONFIG
    if args.func is None:  # `relay schema`
        print(queries.schema_text(settings.outbox.table), end="")
        return 0
    daemon = args.command == "run"
    # One-shot commands keep stdout for their own lines: logs go to stderr, and `check` (whose
    # findings are its output) hears nothing from the Kafka client below errors.
    logs.configure(settings.log, stream=sys.stdout if daemon else sys.stderr, quiet=not daemon)
    try:
        code: int = run_async(args.func(settings, args))
    except Exception as exc:
        exit_code = errors.exit_code(exc)
        if exit_code is None:
            raise  # a bug: the traceback, exit 1
        print(f"relay {args.command}: {errors.one_line(exc)}", file=sys.stderr)
        return exit_code
    return code


if __name__ == "__main__":
    sys.exit(main())
