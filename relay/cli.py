"""Command line: ``relay run | migrate | schema | check | replay | demo | bench``.

Settings are built here, once, from the environment, and passed down.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from relay import __version__, config, logs, queries

EXIT_CONFIG = 2


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

    conn = await db.connect(settings)
    try:
        await store.Store(settings.outbox.table).migrate(conn)
    finally:
        db.close(conn)
    print(f"schema applied: {settings.db.name}.{settings.outbox.table}")
    return 0


async def _check(settings: config.Settings, _: argparse.Namespace) -> int:
    from relay import preflight  # noqa: PLC0415

    results = await preflight.run(settings)
    for result in results:
        print(f"{'ok  ' if result.ok else 'FAIL'} {result.name}: {result.detail}")
    return 0 if all(r.ok for r in results) else 1


async def _replay(settings: config.Settings, args: argparse.Namespace) -> int:
    from relay import db, store  # noqa: PLC0415

    conn = await db.connect(settings, autocommit=False)
    try:
        changed = await store.Store(settings.outbox.table).replay(conn, args.id, args.limit)
    finally:
        db.close(conn)
    print(f"rows put back to new: {changed}")
    return 0


async def _demo(settings: config.Settings, args: argparse.Namespace) -> int:
    from relay import bench  # noqa: PLC0415

    return await bench.demo(settings, args)


async def _bench(settings: config.Settings, args: argparse.Namespace) -> int:
    from relay import bench  # noqa: PLC0415

    return await bench.main(settings, args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay", description=__doc__)
    p.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the relay daemon").set_defaults(func=_run)
    sub.add_parser("migrate", help="create the outbox tables (idempotent)").set_defaults(
        func=_migrate
    )
    sub.add_parser("schema", help="print the outbox schema SQL").set_defaults(func=None)
    sub.add_parser("check", help="pre-flight checks; exit 1 on any failure").set_defaults(
        func=_check
    )
    replay = sub.add_parser("replay", help="put failed rows back to new")
    replay.add_argument("--id", type=int, action="append", help="only this row id (repeatable)")
    replay.add_argument("--limit", type=int, default=1_000_000, help="at most this many rows")
    replay.set_defaults(func=_replay)
    demo = sub.add_parser("demo", help="relay + simulated Service A and B with live figures")
    demo.set_defaults(func=_demo)
    bench_p = sub.add_parser("bench", help="measure latency and throughput against real servers")
    bench_p.set_defaults(func=_bench)
    try:
        from relay import bench  # noqa: PLC0415

        bench.add_arguments(demo, bench_p)
    except ImportError:  # pragma: no cover
        pass
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = config.load()
    except config.ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.func is None:  # `relay schema`
        print(queries.schema_text(settings.outbox.table), end="")
        return 0
    logs.configure(settings.log)
    code: int = run_async(args.func(settings, args))
    return code


if __name__ == "__main__":
    sys.exit(main())
