"""Issue 7, "order is never broken", against the real servers: every failure path keeps the
per-aggregate order and loses nothing.

Within a cycle, once a record of an aggregate fails to be enqueued or acknowledged, no later
record of that aggregate is marked published; a poison row holds its aggregate (``hold``, the
default) until ``relay skip`` or ``relay replay`` releases it, while the other aggregates, those
of the same shard included, keep flowing; operational errors (a missing topic, a grant revoked)
never make a row 'failed'.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import itertools
import json
import os
import re
import sys
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import procmem
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from integration import helpers
from servers import REPO_ROOT, Kafka, MariaDB, unique_name

from relay import app, config, writer
from relay.tools import net, processes, topics

pytestmark = pytest.mark.integration

AGGREGATE_TYPE = "order"  # helpers.event's
SHARDS = 64
RESERVED_HEADERS = ("message_id", "event_type", "aggregate_type")
INVALID_JSON = '{"a":"\\q","b":1.}'  # MariaDB's JSON_VALID accepts it; no JSON parser does
RSS_LIMIT_MB = 150.0


# ------------------------------------------------------------------ relay, in or out of process


@contextlib.asynccontextmanager
async def running(settings: config.Settings) -> AsyncIterator[app.App]:
    """``relay run`` in this process (:func:`helpers.running`) until the block ends; it must not
    stop by itself."""
    async with helpers.running(settings) as (relay, task):
        yield relay
        assert not task.done(), f"the relay stopped: {task.result()!r}"


def relay_env(settings: config.Settings, workdir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a ``relay`` command with ``settings``' database, broker and table."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("RELAY_")}
    env |= processes.settings_env(
        db__host=settings.db.host,
        db__port=settings.db.port,
        db__user=settings.db.user,
        db__password=settings.db.password.get_secret_value(),
        db__name=settings.db.name,
        kafka__bootstrap_servers=settings.kafka.bootstrap_servers,
        kafka__request_timeout_s=5,
        outbox__table=settings.outbox.table,
        outbox__topic_template=settings.outbox.topic_template,
        http__host="127.0.0.1",
        http__port=0,
        log__format="json",
    )
    env["RELAY_SECRETS_DIR"] = str(workdir / "no-secrets")
    return env | overrides


async def relay_cli(
    env: Mapping[str, str], *args: str, timeout_s: float = 60.0
) -> tuple[int | None, str, str]:
    """``relay <args>`` (this interpreter, ``-m relay``): exit code (None: killed after
    ``timeout_s``), stdout, stderr. Asynchronous: an in-process relay keeps running meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        *args,
        env=dict(env),
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    code: int | None
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
        code = proc.returncode
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        code = None
    return code, out.decode(errors="replace"), err.decode(errors="replace")


# ------------------------------------------------------------------ rows, shards, Kafka


def shard_of(aggregate_id: str) -> int:
    """The schema's ``CRC32(aggregate_id) % 64``."""
    return zlib.crc32(aggregate_id.encode()) % SHARDS


def shard_mates(aggregate_id: str, count: int) -> list[str]:
    """``count`` other aggregate ids in the same shard as ``aggregate_id``."""
    shard = shard_of(aggregate_id)
    candidates = (f"{aggregate_id}-mate-{i}" for i in itertools.count())
    return list(itertools.islice((c for c in candidates if shard_of(c) == shard), count))


def json_blob(size: int) -> bytes:
    """A JSON string of ``size`` bytes (a payload the envelope accepts), hard to compress."""
    return f'"{blob(size - 2)}"'.encode()


def write_sync(mariadb: MariaDB, database: str, events: Sequence[writer.Event]) -> None:
    """Insert events in one committed transaction with PyMySQL."""
    conn = mariadb.connect(database, autocommit=False)
    try:
        with conn.cursor() as cur:
            writer.OutboxWriter(helpers.TABLE).add_sync(cur, *events)
        conn.commit()
    finally:
        conn.close()


def blob(size: int) -> str:
    """``size`` characters that no codec can shrink much (base64 of random bytes)."""
    return base64.b64encode(os.urandom(size * 3 // 4)).decode()[:size]


@dataclasses.dataclass
class Rows:
    """The outbox rows of one test, by name."""

    settings: config.Settings
    message_ids: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def table(self) -> str:
        return self.settings.outbox.table

    async def write(self, *named: tuple[str, writer.Event]) -> None:
        """Insert events in one committed transaction (Service A)."""
        await helpers.write(self.settings, *(e for _, e in named))
        self.message_ids |= {name: e.message_id for name, e in named}

    async def raw(self, name: str, aggregate_id: str, **columns: object) -> int:
        """Insert one row with plain SQL (what a writer in another language may do); its id."""
        message_id = str(uuid.uuid4())
        values = {
            "message_id": message_id,
            "aggregate_type": AGGREGATE_TYPE,
            "aggregate_id": aggregate_id,
            "event_type": "OrderChanged",
            **columns,
        }
        marks = ", ".join(["%s"] * len(values))
        await helpers.sql(
            self.settings,
            f"INSERT INTO `{self.table}` ({', '.join(values)}) VALUES ({marks})",
            list(values.values()),
        )
        self.message_ids[name] = message_id
        return await self.row_id(name)

    async def poison_among_mates(self, x: str, mates: Sequence[str], **poison: object) -> int:
        """Aggregate ``x``'s rows x1, bad (a raw row with the ``poison`` columns), x2 and x3, with
        rows mate0..mate3 of four of its shard ``mates`` among them; bad's id."""
        await self.write(("x1", helpers.event(x, 1)))
        bad = await self.raw("bad", x, **poison)
        await self.write(
            ("x2", helpers.event(x, 2)),
            ("mate0", helpers.event(mates[0])),
            ("mate1", helpers.event(mates[1])),
            ("x3", helpers.event(x, 3)),
            ("mate2", helpers.event(mates[2])),
            ("mate3", helpers.event(mates[3])),
        )
        return bad

    async def row_id(self, name: str) -> int:
        rows = await helpers.sql(
            self.settings,
            f"SELECT id FROM `{self.table}` WHERE message_id = %s",
            [self.message_ids[name]],
        )
        return int(rows[0][0])

    async def column(self, name: str, column: str) -> Any:
        rows = await helpers.sql(
            self.settings,
            f"SELECT `{column}` FROM `{self.table}` WHERE message_id = %s",
            [self.message_ids[name]],
        )
        return rows[0][0]

    async def statuses(self, names: Sequence[str] | None = None) -> dict[str, str | None]:
        current = await helpers.statuses(self.settings)
        return {n: current.get(self.message_ids[n]) for n in names or self.message_ids}

    async def settle(self, expected: Mapping[str, str], timeout_s: float = 30.0) -> None:
        """Until none of these rows is new any more; then their statuses must be ``expected``."""

        async def settled() -> bool:
            return "new" not in (await self.statuses(list(expected))).values()

        when = "once none was new"
        try:
            await helpers.wait_until(settled, "the rows to leave 'new'", timeout_s)
        except TimeoutError:
            when = f"after {timeout_s:g} s"
        current = await self.statuses(list(expected))
        wrong = {n: f"{current[n]} (expected {s})" for n, s in expected.items() if current[n] != s}
        assert not wrong, f"rows in the wrong status {when}: {wrong}"

    async def reach(self, expected: Mapping[str, str], timeout_s: float = 30.0) -> None:
        """Until these rows have exactly these statuses."""

        async def reached() -> bool:
            return await self.statuses(list(expected)) == dict(expected)

        try:
            await helpers.wait_until(reached, "the rows to reach their statuses", timeout_s)
        except TimeoutError:
            current = await self.statuses(list(expected))
            wrong = {
                n: f"{current[n]} (expected {s})" for n, s in expected.items() if current[n] != s
            }
            raise AssertionError(f"after {timeout_s:g} s: {wrong}") from None

    def names(self, message_ids: Sequence[str]) -> list[str]:
        """Message ids back to row names (unknown ids as they are)."""
        by_id = {m: n for n, m in self.message_ids.items()}
        return [by_id.get(m, m) for m in message_ids]

    async def hold(self, aggregate_id: str) -> list[tuple[Any, ...]]:
        """The aggregate's row in ``<table>_hold``: ``[(kind, failed_id)]`` or ``[]``."""
        return await helpers.sql(
            self.settings,
            f"SELECT kind, failed_id FROM `{self.table}_hold`"
            " WHERE aggregate_type = %s AND aggregate_id = %s",
            [AGGREGATE_TYPE, aggregate_id],
        )


@dataclasses.dataclass(frozen=True)
class Delivered:
    partition: int
    offset: int
    headers: list[tuple[str, bytes]]

    @property
    def message_id(self) -> str:
        """The first ``message_id`` header (the relay's own)."""
        return next((v.decode() for k, v in self.headers if k == "message_id"), "")


async def delivered(kafka: Kafka, topic: str) -> list[Delivered]:
    """Every record of ``topic`` up to its end offsets now, in (partition, offset) order; values
    are dropped (only headers are kept)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await helpers.partitions_of(kafka, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        records: list[Delivered] = []
        async with asyncio.timeout(60):
            while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                batches = await consumer.getmany(*tps, timeout_ms=200)
                for tp, batch in batches.items():
                    records += [
                        Delivered(tp.partition, r.offset, list(r.headers or ()))
                        for r in batch
                        if r.offset < ends[tp]
                    ]
    finally:
        await consumer.stop()
    return sorted(records, key=lambda r: (r.partition, r.offset))


def first_deliveries(records: Sequence[Delivered], message_ids: Sequence[str]) -> list[str]:
    """The first delivery of each of ``message_ids``, in partition order (one key: one
    partition, so this is the order a consumer of that aggregate sees)."""
    wanted = set(message_ids)
    seen: dict[str, None] = {}
    for record in records:
        if record.message_id in wanted:
            seen.setdefault(record.message_id)
    return list(seen)


def objects(doc: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object in ``doc``, nested ones included."""
    if isinstance(doc, dict):
        yield doc
        for value in doc.values():
            yield from objects(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from objects(value)


@contextlib.contextmanager
def db_user(mariadb: MariaDB, grants: Sequence[str]) -> Iterator[tuple[str, str]]:
    """A MariaDB user with only ``grants`` (``"SELECT ON db.*"``...); dropped afterwards."""
    user, password = unique_name("relay_t_"), uuid.uuid4().hex
    conn = mariadb.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (user, password))
            for grant in grants:
                cur.execute(f"GRANT {grant} TO %s@'%%'", (user,))
        yield user, password
    finally:
        with conn.cursor() as cur:
            cur.execute("DROP USER IF EXISTS %s@'%%'", (user,))
        conn.close()


# ------------------------------------------------------------------ a. too large, two workers


async def test_too_large_row_fails_alone_with_two_workers(
    mariadb: MariaDB, kafka: Kafka, database: str
) -> None:
    """The broker refuses any produce batch over 20,000 bytes. A 30 KB row among 3 KB rows of
    other aggregates, two workers sharing the process: only the 30 KB row fails (too_large);
    no 3 KB row is ever failed for having shared a refused batch, whoever's worker sent it."""
    rounds, smalls = 4, 40
    async with helpers.fresh_topic(
        kafka, partitions=1, configs={"max.message.bytes": "20000"}
    ) as topic:
        settings = await helpers.migrated(mariadb, database, kafka, topic, worker={"count": 2})
        rows = Rows(settings)
        async with running(settings):
            for r in range(rounds):
                small = [
                    (f"r{r}-small-{i}", helpers.event(f"r{r}-s{i}", after={"blob": blob(3000)}))
                    for i in range(smalls)
                ]
                big = (f"r{r}-big", helpers.event(f"r{r}-big", after={"blob": blob(30_000)}))
                await rows.write(*small[: smalls // 2], big, *small[smalls // 2 :])
                await rows.settle(
                    dict.fromkeys((n for n, _ in small), "published") | {big[0]: "failed"}
                )
        for r in range(rounds):
            error = await rows.column(f"r{r}-big", "last_error")
            assert str(error).startswith("too_large"), error
        records = await delivered(kafka, topic)
        got = {r.message_id for r in records}
        small_ids = {m for n, m in rows.message_ids.items() if "-small-" in n}
        assert small_ids <= got, f"{len(small_ids - got)} small rows not delivered"
        assert not got - small_ids, (
            f"delivered yet not small: {rows.names(sorted(got - small_ids))}"
        )


# ------------------------------------------------------------------ b. dead-letter copy fails


async def test_dead_letter_copy_failure_keeps_acknowledged_rows(
    mariadb: MariaDB, kafka: Kafka, database: str, topic: str
) -> None:
    """The dead-letter topic does not exist: the poison row is still marked failed (the copy's
    failure in last_error), the other rows published exactly once (no republish loop)."""
    dead_letters = unique_name("dl_")  # never created
    dead_letter = {"dead_letter_topic": dead_letters}
    settings = await helpers.migrated(mariadb, database, kafka, topic, outbox=dead_letter)
    rows = Rows(settings)
    await rows.write(*((f"before-{i}", helpers.event(f"b{i}")) for i in range(10)))
    await rows.raw("poison", "poison", headers="[1, 2]")
    await rows.write(*((f"after-{i}", helpers.event(f"a{i}")) for i in range(10)))
    good = [n for n in rows.message_ids if n != "poison"]
    async with running(settings):
        await rows.settle(dict.fromkeys(good, "published") | {"poison": "failed"}, timeout_s=20)
    error = str(await rows.column("poison", "last_error"))
    assert error.startswith("bad_headers"), error
    assert re.search(r"dead[-_ ]?letter", error, re.IGNORECASE), error
    copies = collections.Counter(r.message_id for r in await delivered(kafka, topic))
    assert copies == collections.Counter(rows.message_ids[n] for n in good), {
        rows.names([m])[0]: c for m, c in copies.items() if c != 1
    }


# ------------------------------------------------------------------ c. topic created late


async def test_topic_created_late_delivers_waiting_rows_in_order_without_replay(
    mariadb: MariaDB, kafka: Kafka, database: str, topic: str
) -> None:
    """Aggregate X's rows go to a topic that does not exist yet: they wait (new or held, with a
    timed hold), never 'failed', while the other aggregates, of X's shard too, are delivered.
    Once the topic exists, X's rows are delivered in order with no `relay replay`."""
    late = unique_name("late_")
    hold_retry = {"hold_retry_initial_s": 0.2, "hold_retry_max_s": 1.0}
    settings = await helpers.migrated(mariadb, database, kafka, topic, worker=hold_retry)
    rows = Rows(settings)
    x, mates = "late-x", shard_mates("late-x", 3)
    named: list[tuple[str, writer.Event]] = []
    for i in range(4):
        named.append((f"x{i}", helpers.event(x, i, topic=late)))
        if i < 3:
            named += [
                (f"mate{i}", helpers.event(mates[i], i)),
                (f"other{i}", helpers.event(f"o{i}")),
            ]
    await rows.write(*named)
    xs = [f"x{i}" for i in range(4)]
    others = [n for n in rows.message_ids if n not in xs]

    async def x_waits() -> bool:
        statuses = await rows.statuses(xs)
        assert set(statuses.values()) <= {"new", "held"}, f"X's rows: {statuses}"
        return [kind for kind, _ in await rows.hold(x)] == ["timed"]

    try:
        async with running(settings):
            await rows.settle(dict.fromkeys(others, "published"))
            await helpers.wait_until(x_waits, "a timed hold on X, its rows waiting", 20)
            await rows.write(("mate-later", helpers.event(mates[0], 9)))  # still flowing
            await rows.reach({"mate-later": "published"})
            assert await x_waits()
            await topics.create(kafka.options, late, 1)
            await rows.reach(dict.fromkeys(xs, "published"))
        unpublished = await helpers.sql(
            settings, "SELECT id FROM outbox WHERE status <> 'published'"
        )
        assert not unpublished, unpublished
        assert await rows.hold(x) == []
        order = first_deliveries(await delivered(kafka, late), [rows.message_ids[n] for n in xs])
        assert rows.names(order) == xs
    finally:
        with contextlib.suppress(KafkaError, OSError):  # never created if the test failed early
            await topics.delete(kafka.options, [late])


# ------------------------------------------------------------------ d. invalid JSON, then release


@pytest.mark.parametrize("release", ["skip", "replay"])
async def test_invalid_json_holds_its_aggregate_until_released(
    mariadb: MariaDB, kafka: Kafka, database: str, topic: str, *, tmp_path: Path, release: str
) -> None:
    """A row whose after_state MariaDB accepts but no JSON parser does fails (bad_json) and holds
    its aggregate: the later rows are 'held', not delivered; the aggregates of the same shard
    are delivered. `relay skip --id` delivers the later rows in order; `relay replay --id` after
    fixing the row delivers it first, then the later ones."""
    poison = {"on_poison": "hold"}
    settings = await helpers.migrated(mariadb, database, kafka, topic, outbox=poison)
    rows = Rows(settings)
    x, mates = "json-x", shard_mates("json-x", 4)
    bad = await rows.poison_among_mates(x, mates, after_state=INVALID_JSON)
    shards = await helpers.sql(settings, "SELECT DISTINCT shard FROM outbox")
    assert shards == [(shard_of(x),)], shards  # the schema's shard is ours: all in one
    mate_names = [f"mate{i}" for i in range(4)]
    async with running(settings):
        await rows.settle(
            {"x1": "published", "bad": "failed", "x2": "held", "x3": "held"}
            | dict.fromkeys(mate_names, "published")
        )
        error = str(await rows.column("bad", "last_error"))
        assert error.startswith("bad_json"), error
        assert await rows.hold(x) == [("poison", bad)]
        got = sorted(set(rows.names([r.message_id for r in await delivered(kafka, topic)])))
        assert got == sorted(["x1", *mate_names]), got  # not x2, x3 (held) nor bad
        env = relay_env(settings, tmp_path)
        if release == "skip":
            code, out, err = await relay_cli(env, "skip", "--id", str(bad))
            assert code == 0, out + err
            await rows.reach({"bad": "skipped", "x2": "published", "x3": "published"})
            resolved = await helpers.sql(
                settings, "SELECT resolved_by, resolved_at FROM outbox WHERE id = %s", [bad]
            )
            assert all(v is not None for v in resolved[0]), resolved
            expected = ["x1", "x2", "x3"]
        else:
            await helpers.sql(
                settings,
                "UPDATE outbox SET after_state = %s WHERE id = %s",
                ['{"a": "q", "b": 1.0}', bad],
            )
            code, out, err = await relay_cli(env, "replay", "--id", str(bad))
            assert code == 0, out + err
            await rows.reach({"bad": "published", "x2": "published", "x3": "published"})
            expected = ["x1", "bad", "x2", "x3"]
        assert await rows.hold(x) == []
    records = await delivered(kafka, topic)
    order = first_deliveries(records, [rows.message_ids[n] for n in ["x1", "bad", "x2", "x3"]])
    assert rows.names(order) == expected


# ------------------------------------------------------------------ e. reserved header names


async def test_reserved_header_names_fail_the_row(
    mariadb: MariaDB, kafka: Kafka, database: str, topic: str
) -> None:
    """A row whose own headers use a name the relay sets (message_id, event_type,
    aggregate_type) fails with bad_headers: no record ever carries such a header twice."""
    settings = await helpers.migrated(mariadb, database, kafka, topic)
    rows = Rows(settings)
    for name in RESERVED_HEADERS:
        await rows.raw(name, f"hdr-{name}", headers=json.dumps({name: "x", "trace": "t"}))
    await rows.write(
        *((f"good-{i}", helpers.event(f"g{i}", headers={"trace": "t"})) for i in range(5))
    )
    good = [f"good-{i}" for i in range(5)]
    async with running(settings):
        await rows.settle(
            dict.fromkeys(RESERVED_HEADERS, "failed") | dict.fromkeys(good, "published")
        )
    for name in RESERVED_HEADERS:
        error = str(await rows.column(name, "last_error"))
        assert error.startswith("bad_headers"), error
    records = await delivered(kafka, topic)
    for record in records:
        names = collections.Counter(k for k, _ in record.headers)
        assert all(names[n] == 1 for n in RESERVED_HEADERS), record
    assert sorted(rows.names([r.message_id for r in records])) == good


# ------------------------------------------------------------------ f. UPDATE denied


async def test_run_exits_4_without_the_update_grant(
    mariadb: MariaDB, kafka: Kafka, database: str, topic: str, tmp_path: Path
) -> None:
    """`relay run` as a user that may SELECT but not UPDATE the outbox exits 4 at start-up,
    naming the missing grant (instead of publishing rows it can never mark)."""
    settings = await helpers.migrated(mariadb, database, kafka, topic)
    with db_user(mariadb, [f"SELECT ON `{database}`.*"]) as (user, password):
        env = relay_env(settings, tmp_path, RELAY_DB__USER=user, RELAY_DB__PASSWORD=password)
        code, out, err = await relay_cli(env, "run", timeout_s=30)
    assert code == 4, f"exit {code} (None: still running after 30 s)\n{out[-2000:]}{err[-2000:]}"
    assert "UPDATE" in out + err, out + err


async def test_update_revoked_while_running_backs_off_and_turns_unready(
    mariadb: MariaDB, kafka: Kafka, database: str, topic: str
) -> None:
    """UPDATE on the outbox revoked while the relay runs: rows are published but can never be
    marked. The relay backs off (up to RELAY_WORKER__BACKOFF_MAX_S) and proves the mark step
    works before publishing again, instead of republishing in a loop: one copy of each row in
    20 s; /readyz turns 503 and the ready gauge 0 after
    RELAY_WORKER__UNREADY_AFTER_FAILED_CYCLES failed cycles; the rows stay new. With the grant
    back, they are published and the relay is ready again."""
    window_s, max_copies = 20.0, 2  # one copy: later cycles prove the mark works first
    settings = await helpers.migrated(mariadb, database, kafka, topic)
    tables = [str(t) for (t,) in await helpers.sql(settings, "SHOW TABLES")]
    # table-level grants: a REVOKE takes effect on the relay's open connections at once
    grants = [f"SELECT, INSERT, UPDATE, DELETE ON `{database}`.`{t}`" for t in tables]
    with db_user(mariadb, grants) as (user, password):
        restricted = helpers.make_settings(
            mariadb,
            database,
            kafka.bootstrap,
            db={"user": user, "password": password},
            outbox={"topic_template": topic},
            worker={  # the relay's defaults, not make_settings' fast test backoff
                "count": 2,
                "backoff_initial_s": 0.1,
                "backoff_max_s": 5.0,
                "unready_after_failed_cycles": 5,
            },
        )
        rows = Rows(settings)  # written as Service A, not as the relay's user
        async with running(restricted) as relay:
            port = relay.http_server.port

            async def readyz(status: int) -> bool:
                return (await net.http_get(port, "/readyz"))[0] == status

            await rows.write(*((f"warm-{i}", helpers.event(f"w{i}")) for i in range(3)))
            await rows.reach(dict.fromkeys((f"warm-{i}" for i in range(3)), "published"))
            await helpers.wait_until(lambda: readyz(200), "/readyz 200")
            gauge_before = helpers.metric("outbox_relay_ready")
            helpers.server_sql(
                mariadb, f"REVOKE UPDATE ON `{database}`.`outbox` FROM %s@'%%'", user
            )
            late = [f"late-{i}" for i in range(5)]
            await rows.write(*((n, helpers.event(n)) for n in late))
            started = time.monotonic()
            unready_after_s: float | None = None
            gauge_zero = False
            while (elapsed := time.monotonic() - started) < window_s:  # the measured window
                if unready_after_s is None and await readyz(503):
                    unready_after_s = round(elapsed, 1)
                gauge_zero = gauge_zero or helpers.metric("outbox_relay_ready") == 0
                await asyncio.sleep(0.25)
            late_ids = {rows.message_ids[n] for n in late}
            copies = collections.Counter(
                r.message_id for r in await delivered(kafka, topic) if r.message_id in late_ids
            )
            statuses = await rows.statuses(late)
            figures = (
                f"copies in {window_s:g} s: {sorted(copies.values())}; 503 after: "
                f"{unready_after_s} s; ready gauge before {gauge_before}, 0 seen: {gauge_zero}; "
                f"statuses {statuses}"
            )
            assert set(statuses.values()) == {"new"}, figures
            assert max(copies.values(), default=0) < max_copies, figures
            assert unready_after_s is not None, figures
            assert gauge_before == 1 and gauge_zero, figures

            helpers.server_sql(mariadb, f"GRANT UPDATE ON `{database}`.`outbox` TO %s@'%%'", user)
            await rows.reach(dict.fromkeys(late, "published"))
            await helpers.wait_until(lambda: readyz(200), "/readyz 200 again", 30)


# ------------------------------------------------------------------ g. big rows, bounded memory


async def test_big_rows_relay_process_stays_under_150_mb(
    mariadb: MariaDB, kafka: Kafka, database: str, tmp_path: Path
) -> None:
    """80 rows of 900 KB (payload) waiting at start-up: one relay process delivers them all, in
    order, with a peak RSS of at most 150 MB (RELAY_WORKER__BATCH_MAX_BYTES bounds a claim)."""
    aggregates, per_aggregate, size = 16, 5, 900_000
    async with helpers.fresh_topic(
        kafka, partitions=3, configs={"max.message.bytes": str(1024 * 1024)}
    ) as topic:
        settings = await helpers.migrated(mariadb, database, kafka, topic)
        rows = Rows(settings)
        for seq in range(per_aggregate):
            named = [
                (f"big-{a}-{seq}", helpers.event(f"big-{a}", seq, payload=json_blob(size)))
                for a in range(aggregates)
            ]
            # PyMySQL: aiomysql 0.3 cannot send bytes parameters with PyMySQL 1.2 installed
            await asyncio.to_thread(write_sync, mariadb, database, [e for _, e in named])
            rows.message_ids |= {name: e.message_id for name, e in named}
        port = net.free_port()
        env = relay_env(
            settings,
            tmp_path,
            RELAY_KAFKA__MAX_REQUEST_BYTES=str(2 * 1024 * 1024),
            RELAY_HTTP__PORT=str(port),
        )
        relay = processes.RelayProcess("relay", env, port, tmp_path / "relay.log", cwd=REPO_ROOT)
        relay.start()
        try:
            relay.start_sampling()
            await rows.reach(dict.fromkeys(rows.message_ids, "published"), timeout_s=120)
            peak_mb = procmem.peak_rss_mb(relay)
            assert await relay.stop() == 0, relay.tail()
        finally:
            await relay.stop()
        records = await delivered(kafka, topic)
        for a in range(aggregates):
            names = [f"big-{a}-{seq}" for seq in range(per_aggregate)]
            order = first_deliveries(records, [rows.message_ids[n] for n in names])
            assert rows.names(order) == names
        print(f"\n80 rows of 900 KB: relay peak RSS {peak_mb} MB")  # noqa: T201 - a figure
        assert peak_mb <= RSS_LIMIT_MB, f"relay peak RSS {peak_mb} MB > {RSS_LIMIT_MB} MB"


# ------------------------------------------------------------------ h. settings typos


async def test_unknown_setting_and_bad_template_exit_78(
    mariadb: MariaDB, kafka: Kafka, database: str, tmp_path: Path
) -> None:
    """A misspelt group (RELAY_WORKERS__COUNT) or a template with an unbalanced brace: `relay
    run` and `relay check` exit 78 (EX_CONFIG) with one line naming the variable."""
    env = relay_env(helpers.make_settings(mariadb, database, kafka.bootstrap), tmp_path)
    cases = [
        ("RELAY_WORKERS__COUNT", "2", "run"),
        ("RELAY_OUTBOX__TOPIC_TEMPLATE", "x.{aggregate_type}}", "run"),
        ("RELAY_OUTBOX__TOPIC_TEMPLATE", "x.{aggregate_type}}", "check"),
    ]
    for variable, value, command in cases:
        code, out, err = await relay_cli(env | {variable: value}, command, timeout_s=20)
        what = f"relay {command} with {variable}={value}: exit {code}\n{out}{err}"
        assert code == 78, what
        assert len(err.strip().splitlines()) == 1, what
        assert variable in err, what
        assert "Traceback" not in out + err, what


# ------------------------------------------------------------------ i. hold, list, release


async def test_poison_hold_listed_then_released_by_aggregate(
    mariadb: MariaDB, kafka: Kafka, database: str, topic: str, tmp_path: Path
) -> None:
    """A poison row holds its aggregate X: X's later rows stay 'held' while every other aggregate
    of X's shard is delivered; `relay failed [--json]` lists the row and the hold; with the
    failed row deleted by hand, `relay skip --aggregate TYPE:ID` releases X, whose rows are then
    delivered in order."""
    settings = await helpers.migrated(mariadb, database, kafka, topic)
    rows = Rows(settings)
    x, mates = "held-x", shard_mates("held-x", 5)
    bad = await rows.poison_among_mates(x, mates, headers="[1, 2]")
    env = relay_env(settings, tmp_path)

    async def held_gauge(value: float) -> bool:
        return helpers.metric("outbox_relay_held_aggregates", kind="poison") == value

    async with running(settings):
        await rows.settle(
            {"x1": "published", "bad": "failed", "x2": "held", "x3": "held"}
            | dict.fromkeys((f"mate{i}" for i in range(4)), "published")
        )
        await rows.write(("mate4", helpers.event(mates[4])))  # the shard still flows
        await rows.reach({"mate4": "published"})
        assert await rows.statuses(["x2", "x3"]) == {"x2": "held", "x3": "held"}
        await helpers.wait_until(lambda: held_gauge(1), "held_aggregates{kind=poison} = 1")

        code, out, err = await relay_cli(env, "failed", "--json")
        assert code == 0, out + err
        doc = json.loads(out)
        assert any(str(o.get("id")) == str(bad) for o in objects(doc)), out
        assert any(
            o.get("aggregate_id") == x and o.get("kind") == "poison" for o in objects(doc)
        ), out
        code, out, err = await relay_cli(env, "failed")
        assert code == 0, out + err
        assert str(bad) in out and x in out, out

        await helpers.sql(settings, "DELETE FROM outbox WHERE id = %s", [bad])
        code, out, err = await relay_cli(env, "skip", "--aggregate", f"{AGGREGATE_TYPE}:{x}")
        assert code == 0, out + err
        await rows.reach({"x2": "published", "x3": "published"})
        assert await rows.hold(x) == []
        await helpers.wait_until(lambda: held_gauge(0), "held_aggregates{kind=poison} = 0")
    order = first_deliveries(
        await delivered(kafka, topic), [rows.message_ids[n] for n in ("x1", "x2", "x3")]
    )
    assert rows.names(order) == ["x1", "x2", "x3"]
