"""Poison rows against the real Kafka: marked failed with a reason, counted, dead-lettered,
replayable; the other aggregates' rows are published all the same."""

from __future__ import annotations

import base64
import os

import orjson
import pytest
from integration import helpers
from servers import Kafka, MariaDB

from relay import config, triage

pytestmark = pytest.mark.integration


async def _raw_insert(settings: config.Settings, aggregate_id: str, **columns: object) -> None:
    names = ["message_id", "aggregate_type", "aggregate_id", "event_type", *columns]
    values = [helpers.event(aggregate_id).message_id, "order", aggregate_id, "E", *columns.values()]
    marks = ", ".join(["%s"] * len(values))
    await helpers.sql(settings, f"INSERT INTO outbox ({', '.join(names)}) VALUES ({marks})", values)


@pytest.mark.parametrize("batch_size", [1, 500], ids=["alone", "shared-batch"])
async def test_broker_rejects_too_large_record(
    mariadb: MariaDB, kafka: Kafka, database: str, batch_size: int
) -> None:
    """The topic takes at most 2048 bytes per batch: only the big row may fail, never the small
    rows the producer happened to batch with it."""
    async with (
        helpers.fresh_topic(kafka, partitions=1, configs={"max.message.bytes": "2048"}) as topic,
        helpers.fresh_topic(kafka, partitions=1) as dead_letters,
    ):
        settings = await helpers.migrated(
            mariadb,
            database,
            kafka,
            topic,
            outbox={"dead_letter_topic": dead_letters},
            worker={"batch_size": batch_size},
        )
        # incompressible, far above the topic's 2048 bytes, far below the relay's own limit
        blob = base64.b64encode(os.urandom(8000)).decode()
        before = helpers.metric("outbox_relay_failed_total", reason="too_large")
        dead_before = helpers.metric("outbox_relay_dead_lettered_total")
        small = [helpers.event(f"small-{i}", i) for i in range(10)]
        big = helpers.event("big", after={"blob": blob})
        # one commit: the big record shares a batch (and the only partition) with small ones
        ids = await helpers.write(settings, *small[:5], big, *small[5:])
        async with helpers.running_worker(settings) as (w, task):
            expected = dict.fromkeys(ids, "published")
            expected[big.message_id] = "failed"
            await helpers.wait_for_statuses(settings, expected)
            assert w.failed == 1
            assert not task.done()
        rows = await helpers.rows_by_message_id(settings)
        assert rows[big.message_id]["last_error"].startswith("too_large: ")
        assert helpers.metric("outbox_relay_failed_total", reason="too_large") == before + 1
        published = {m.message_id for m in small}
        messages = await helpers.consume(kafka, topic, helpers.has_ids(published))
        assert {m.message_id for m in messages} == published
        # a copy of the failed row's description on the dead-letter topic
        dead = await helpers.consume(kafka, dead_letters, helpers.has_ids({big.message_id}))
        assert len(dead) == 1
        doc = orjson.loads(dead[0].value)
        assert doc["message_id"] == big.message_id
        assert doc["reason"] == "too_large"
        assert dead[0].headers["reason"] == b"too_large"
        assert dead[0].key == b"big"
        assert helpers.metric("outbox_relay_dead_lettered_total") == dead_before + 1


@pytest.mark.parametrize(
    "case",
    [("[1, 2]", "JSON object"), ('{"a": 1}', "'a' must be a string"), ('"x"', "JSON object")],
    ids=["array", "number-value", "string"],
)
async def test_invalid_headers_fail_the_row_only(
    mariadb: MariaDB, kafka: Kafka, database: str, topic: str, case: tuple[str, str]
) -> None:
    headers, detail = case
    settings = await helpers.migrated(mariadb, database, kafka, topic)
    before = helpers.metric("outbox_relay_failed_total", reason="bad_headers")
    good = await helpers.write(settings, *(helpers.event(f"g-{i}") for i in range(5)))
    await _raw_insert(settings, "poison", headers=headers)
    (later,) = await helpers.write(settings, helpers.event("poison", 1))  # same aggregate
    good += await helpers.write(settings, helpers.event("g-after", 1))
    async with helpers.running_worker(settings) as (_, task):
        expected = dict.fromkeys(good, "published") | {later: "held"}
        await helpers.wait_for_statuses(settings, expected)
        assert not task.done()
    rows = await helpers.rows_by_message_id(settings)
    (bad,) = [r for r in rows.values() if r["status"] == "failed"]
    assert bad["last_error"].startswith("bad_headers: ")
    assert detail in bad["last_error"]
    assert helpers.metric("outbox_relay_failed_total", reason="bad_headers") == before + 1
    messages = await helpers.consume(kafka, topic, helpers.has_ids(set(good)))
    assert {m.message_id for m in messages} == set(good)  # the held row did not go out


async def test_missing_topic_waits_and_invalid_topic_fails_then_replay(
    mariadb: MariaDB, kafka: Kafka, database: str, topic: str
) -> None:
    """A missing topic is the operator's to fix: the row waits (held, not failed) while others
    flow. An invalid topic name is the row's fault: failed, then replayed once fixed."""
    hold_retry = {"hold_retry_initial_s": 0.2, "hold_retry_max_s": 0.5}
    settings = await helpers.migrated(mariadb, database, kafka, topic, worker=hold_retry)
    invalid_before = helpers.metric("outbox_relay_failed_total", reason="invalid_topic")
    async with helpers.fresh_topic(kafka) as later:
        pass  # created and deleted: a name that surely does not exist now
    missing = helpers.event("m", topic=later)
    invalid = helpers.event("i", topic="not a topic")
    good = helpers.event("g")
    await helpers.write(settings, missing, invalid, good)
    async with helpers.running_worker(settings) as (_, task):
        await helpers.wait_for_statuses(
            settings,
            {invalid.message_id: "failed", good.message_id: "published"},
        )

        async def missing_waits() -> bool:
            status = (await helpers.statuses(settings))[missing.message_id]
            assert status in {"new", "held"}, status  # never failed
            holds = await helpers.sql(settings, "SELECT kind FROM outbox_hold ORDER BY kind")
            return holds == [("poison",), ("timed",)]

        await helpers.wait_until(missing_waits, "a timed hold on the missing topic's aggregate")
        assert not task.done()
    rows = await helpers.rows_by_message_id(settings)
    assert rows[invalid.message_id]["last_error"].startswith("invalid_topic: ")
    assert helpers.metric("outbox_relay_failed_total", reason="invalid_topic") == invalid_before + 1

    # the operator fixes the invalid row and replays it (`relay replay --id`)
    await helpers.sql(
        settings, "UPDATE outbox SET topic = NULL WHERE message_id = %s", [invalid.message_id]
    )
    outcome = await triage.replay(settings, [rows[invalid.message_id]["id"]], 10)
    assert (outcome.changed, outcome.released) == (1, 1)
    rows = await helpers.rows_by_message_id(settings)
    assert rows[invalid.message_id]["status"] == "new"
    assert rows[invalid.message_id]["last_error"] is None
    async with helpers.running_worker(settings) as (_, task):
        await helpers.wait_for_statuses(settings, {invalid.message_id: "published"})
        assert not task.done()
    wanted = {good.message_id, invalid.message_id}
    messages = await helpers.consume(kafka, topic, helpers.has_ids(wanted))
    assert sorted(m.message_id for m in messages) == sorted(wanted)  # each once
    rows = await helpers.rows_by_message_id(settings)
    assert rows[invalid.message_id]["attempts"] == 2
    assert rows[missing.message_id]["status"] in {"new", "held"}
