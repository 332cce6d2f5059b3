"""The real Publisher over fake producers: one batch per topic-partition in order, a batch's
verdict for each of its records, stop after an enqueue failure, the one-by-one retry on its own
producer, producer reset, dead-letter problems reported."""

from __future__ import annotations

import asyncio

import aiokafka.errors
import pytest
from unit import fakes

from relay import config, envelope, publisher

S = publisher.Status


def _record(row_id: int, aggregate: str, topic: str = "t") -> envelope.Record:
    value = f"v{row_id}".encode()
    return envelope.Record(row_id, ("order", aggregate), topic, aggregate.encode(), value, [], 0)


class Factory:
    """Makes producers in turn; the n-th gets ``verdicts[n]`` (the last one repeats)."""

    def __init__(
        self, *verdicts: dict[bytes, BaseException], topics: frozenset[str] = frozenset({"t"})
    ) -> None:
        self.verdicts = list(verdicts) or [{}]
        self.topics = set(topics)
        self.made: list[fakes.FakeProducer] = []

    def __call__(self) -> fakes.FakeProducer:
        verdicts = self.verdicts[min(len(self.made), len(self.verdicts) - 1)]
        producer = fakes.FakeProducer(self.topics, verdicts)
        self.made.append(producer)
        return producer


async def _publisher(
    factory: Factory, dead_letter_topic: str | None = None, max_request_bytes: int = 1048576
) -> publisher.Publisher:
    settings = config.Settings(
        outbox=config.OutboxSettings(dead_letter_topic=dead_letter_topic),
        kafka=config.KafkaSettings(max_request_bytes=max_request_bytes),
    )
    pub = publisher.Publisher(settings, producer_factory=factory)
    await pub.start()
    return pub


async def test_all_acknowledged_in_order() -> None:
    factory = Factory()
    pub = await _publisher(factory)
    records = [_record(i, "a" if i % 2 else "b") for i in range(1, 6)]
    results = await pub.publish(records)
    assert [r.status for r in results] == [S.ACKED] * 5
    assert factory.made[0].batches == [("t", [r.value for r in records])]  # one batch, in order


async def test_one_batch_per_topic_and_a_full_batch_is_handed_over_first() -> None:
    factory = Factory(topics=frozenset({"t", "u"}))
    pub = await _publisher(factory)
    factory.made[0].batch_capacity = 2
    records = [_record(1, "a"), _record(2, "b", "u"), _record(3, "a"), _record(4, "a")]
    results = await pub.publish(records)
    assert [r.status for r in results] == [S.ACKED] * 4
    assert factory.made[0].batches == [("t", [b"v1", b"v3"]), ("u", [b"v2"]), ("t", [b"v4"])]


async def test_a_batch_verdict_is_each_of_its_records_verdict() -> None:
    # Kafka acknowledges or fails a produce batch whole: v3, acknowledged alone, shares the
    # timeout of v1's batch, and the other topic's batch is unaffected
    factory = Factory({b"v1": aiokafka.errors.KafkaTimeoutError()}, topics=frozenset({"t", "u"}))
    pub = await _publisher(factory)
    records = [_record(1, "a"), _record(2, "b", "u"), _record(3, "c")]
    results = await pub.publish(records)
    assert [r.status for r in results] == [S.RETRY, S.ACKED, S.RETRY]


async def test_nothing_is_enqueued_after_an_enqueue_failure() -> None:
    factory = Factory(topics=frozenset({"t", "u", "w"}))
    pub = await _publisher(factory)
    records = [_record(1, "a"), _record(2, "b", "u"), _record(3, "a"), _record(4, "c", "w")]
    factory.made[0].send_errors[b"v2"] = aiokafka.errors.KafkaTimeoutError()  # buffer full
    results = await pub.publish(records)
    assert [r.status for r in results] == [S.ACKED, S.RETRY, S.ACKED, S.NOT_SENT]
    assert factory.made[0].sent == [b"v1", b"v3"]


async def test_a_timeout_during_a_hand_over_keeps_the_handed_batches_tracked() -> None:
    # the caller's timeout cancels the call while "u"'s hand-over waits; "t"'s batch is in the
    # producer already: the next call waits for its verdict before sending anything more
    factory = Factory(topics=frozenset({"t", "u"}))
    pub = await _publisher(factory)
    producer = factory.made[0]
    producer.hang = True
    producer.blocked_topics.add("u")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await pub.publish([_record(1, "a"), _record(2, "b", "u")])
    assert producer.batches == [("t", [b"v1"])]
    assert pub.unsettled == 1
    following = asyncio.create_task(pub.publish([_record(3, "c")]))
    await asyncio.wait([following], timeout=0.05)
    assert not following.done()  # held back behind the unsettled batch
    assert producer.batches == [("t", [b"v1"])]
    following.cancel()


async def test_a_full_batch_refused_by_the_producer_stops_the_call() -> None:
    factory = Factory(topics=frozenset({"t", "u"}))
    pub = await _publisher(factory)
    factory.made[0].batch_capacity = 2
    factory.made[0].send_errors[b"v1"] = aiokafka.errors.KafkaTimeoutError()
    records = [_record(1, "a"), _record(2, "b", "u"), _record(3, "a"), _record(4, "a")]
    results = await pub.publish(records)
    assert [r.status for r in results] == [S.RETRY, S.NOT_SENT, S.RETRY, S.NOT_SENT]
    assert factory.made[0].sent == []


async def test_a_record_over_the_request_size_is_poison_and_stops_its_aggregate() -> None:
    factory = Factory()
    pub = await _publisher(factory, max_request_bytes=1024)
    big = envelope.Record(2, ("order", "b"), "t", b"b", b"x" * 2000, [], 0)
    records = [_record(1, "a"), big, _record(3, "b"), _record(4, "a")]
    results = await pub.publish(records)
    assert [r.status for r in results] == [S.ACKED, S.POISON, S.NOT_SENT, S.ACKED]
    assert results[1].reason == "too_large"
    assert "RELAY_KAFKA__MAX_REQUEST_BYTES=1024" in results[1].error
    assert factory.made[0].sent == [b"v1", b"v4"]


async def test_missing_topic_holds_its_aggregate_only() -> None:
    factory = Factory(topics=frozenset({"t"}))
    pub = await _publisher(factory)
    records = [_record(1, "a", "gone"), _record(2, "b"), _record(3, "a")]
    results = await pub.publish(records)
    assert [r.status for r in results] == [S.HOLD, S.ACKED, S.NOT_SENT]
    assert results[0].reason == "unknown_topic"


async def test_topic_authorization_failure_is_operational_not_poison() -> None:
    denied = aiokafka.errors.TopicAuthorizationFailedError()
    factory = Factory({b"v1": denied}, topics=frozenset({"t", "u"}))
    pub = await _publisher(factory)
    results = await pub.publish([_record(1, "a", "u"), _record(2, "b")])
    assert [r.status for r in results] == [S.HOLD, S.ACKED]


async def test_a_topic_whose_metadata_is_refused_holds_its_aggregates_only() -> None:
    factory = Factory(topics=frozenset({"t", "u"}))
    pub = await _publisher(factory)
    factory.made[0].denied_topics.add("u")
    records = [_record(1, "a"), _record(2, "b", "u"), _record(3, "c"), _record(4, "b")]
    results = await pub.publish(records)
    assert [r.status for r in results] == [S.ACKED, S.HOLD, S.ACKED, S.NOT_SENT]
    assert results[1].reason == "kafka_refused"
    assert factory.made[0].sent == [b"v1", b"v3"]


async def test_no_metadata_for_a_topic_stops_the_call() -> None:
    factory = Factory(topics=frozenset({"t"}))
    pub = await _publisher(factory)
    factory.made[0].client.partitions_for_topic = lambda topic: None  # type: ignore[method-assign]
    results = await pub.publish([_record(1, "a"), _record(2, "b")])
    assert [r.status for r in results] == [S.RETRY, S.NOT_SENT]


async def test_refused_batch_is_retried_alone_on_its_own_producer() -> None:
    too_large = aiokafka.errors.MessageSizeTooLargeError()
    # the main producer's batch (v1..v4) is refused whole; alone, only v2 is too large
    factory = Factory({b"v2": too_large}, {b"v2": too_large})
    pub = await _publisher(factory)
    records = [_record(1, "a"), _record(2, "b"), _record(3, "b"), _record(4, "c")]
    results = await pub.publish(records)
    assert [r.status for r in results] == [S.ACKED, S.POISON, S.NOT_SENT, S.ACKED]
    assert results[1].reason == "too_large"
    main, replacement, solo, next_solo = factory.made
    assert main.stopped  # a refused batch breaks the idempotent sequence: reset
    assert pub.producer is replacement
    assert replacement.sent == []  # nothing else was ever batched with the retries
    assert solo.sent == [b"v1", b"v2"]  # v3 waits behind its aggregate's refused record
    assert solo.stopped  # the refusal broke the solo producer's sequence too
    assert next_solo.sent == [b"v4"]
    assert pub.resets == 1


async def test_out_of_order_sequence_resets_the_producer_and_retries() -> None:
    factory = Factory({b"v1": aiokafka.errors.OutOfOrderSequenceNumber()}, {})
    pub = await _publisher(factory)
    results = await pub.publish([_record(1, "a")])
    assert results[0].status is S.RETRY
    assert pub.resets == 1
    assert factory.made[0].stopped
    results = await pub.publish([_record(1, "a")])
    assert results[0].status is S.ACKED


async def test_dead_letter_problem_is_reported_not_raised() -> None:
    factory = Factory(topics=frozenset({"t"}))
    pub = await _publisher(factory, dead_letter_topic="dlq")
    store = fakes.FakeStore()
    row = store.insert("a")
    problem = await pub.dead_letter([(row, "too_large", "big")])
    assert problem == "dead-letter topic 'dlq' does not exist"
    factory.made[0].client.known.add("dlq")
    assert await pub.dead_letter([(row, "too_large", "big")]) is None
