"""The idempotent Kafka producer and the publishing of one batch of records.

Every record of a batch ends in one of three outcomes: acknowledged, poison (will never succeed
as it is: mark the row failed) or transient (broker trouble: the row stays new and is retried).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import Sequence
from typing import Any

import aiokafka
import aiokafka.errors
import orjson
import structlog

from relay import config, envelope

log = structlog.get_logger(__name__)

# The broker rejected a whole produce batch as too large: some record in it is, maybe not all.
TOO_LARGE_ERRORS = (aiokafka.errors.MessageSizeTooLargeError, aiokafka.errors.RecordTooLargeError)
# After these the idempotent producer's sequence numbers no longer match the broker's: every
# later send to the partition would fail. The producer is replaced (a new producer id).
RESET_ERRORS = (
    *TOO_LARGE_ERRORS,
    aiokafka.errors.OutOfOrderSequenceNumber,
    aiokafka.errors.UnknownProducerId,
    aiokafka.errors.InvalidProducerEpoch,
    aiokafka.errors.ProducerFenced,
)
# Broker or client verdicts that no retry can change for this record.
POISON_ERRORS: dict[type[BaseException], str] = {
    aiokafka.errors.MessageSizeTooLargeError: "too_large",
    aiokafka.errors.RecordTooLargeError: "too_large",
    aiokafka.errors.InvalidTopicError: "invalid_topic",
    aiokafka.errors.TopicAuthorizationFailedError: "rejected",
    aiokafka.errors.CorruptRecordException: "rejected",
    aiokafka.errors.UnsupportedForMessageFormatError: "rejected",
}


@dataclasses.dataclass(slots=True)
class Outcome:
    """What became of each record of a batch, by position."""

    acked: list[envelope.Record] = dataclasses.field(default_factory=list)
    poison: list[tuple[envelope.Record, str, str]] = dataclasses.field(default_factory=list)
    transient: list[tuple[envelope.Record, str]] = dataclasses.field(default_factory=list)


def producer_options(settings: config.KafkaSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": int(settings.linger_s * 1000),
        "max_batch_size": settings.max_batch_bytes,
        "max_request_size": settings.max_request_bytes,
        "compression_type": None if settings.compression == "none" else settings.compression,
        "request_timeout_ms": int(settings.request_timeout_s * 1000),
        "metadata_max_age_ms": int(settings.metadata_max_age_s * 1000),
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl.create_default_context()
    if settings.sasl_mechanism:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        if settings.sasl_password is not None:
            options["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    return options


class Publisher:
    """One idempotent producer per process, shared by its workers."""

    def __init__(self, settings: config.Settings) -> None:
        self._settings = settings
        self._producer: aiokafka.AIOKafkaProducer | None = None
        self._dead_letter_topic = settings.outbox.dead_letter_topic
        self._reset_lock = asyncio.Lock()

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def start(self) -> None:
        self._producer = await self._new_producer()

    async def _new_producer(self) -> aiokafka.AIOKafkaProducer:
        producer = aiokafka.AIOKafkaProducer(**producer_options(self._settings.kafka))
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    async def reset(self, broken: aiokafka.AIOKafkaProducer) -> None:
        """Replace ``broken`` by a new producer, once, however many workers ask."""
        async with self._reset_lock:
            if id(self._producer) != id(broken):
                return  # already replaced (or stopped)
            log.warning("producer_reset")
            self._producer = await self._new_producer()
        await broken.stop()

    async def stop(self) -> None:
        """Flush what is buffered and close."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    @property
    def producer(self) -> aiokafka.AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("publisher not started")
        return self._producer

    async def missing_topics(self, topics: set[str]) -> set[str]:
        """The topics that do not exist. Raises KafkaError if the cluster is unreachable."""
        client = self.producer.client
        unknown = {t for t in topics if client.cluster.partitions_for_topic(t) is None}
        if not unknown:
            return set()
        metadata = await client.fetch_all_metadata()
        existing: set[str] = metadata.topics()
        for topic in unknown & existing:
            client.add_topic(topic)
        return unknown - existing

    async def publish(self, records: Sequence[envelope.Record]) -> Outcome:
        """Send every record and wait for each verdict. The caller bounds this with a timeout."""
        outcome = Outcome()
        missing = await self.missing_topics({r.topic for r in records})
        producer = self.producer
        pending: list[tuple[envelope.Record, asyncio.Future[Any]]] = []
        for record in records:
            if record.topic in missing:
                outcome.poison.append((record, "unknown_topic", f"topic {record.topic!r} missing"))
                continue
            try:
                future = await producer.send(
                    record.topic, record.value, key=record.key, headers=record.headers
                )
            except aiokafka.errors.KafkaError as exc:  # refused by the client: this record alone
                self._sort(outcome, record, exc)
            else:
                pending.append((record, future))
        results = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
        suspects: list[envelope.Record] = []
        reset = False
        for (record, _), result in zip(pending, results, strict=True):
            if isinstance(result, TOO_LARGE_ERRORS):
                suspects.append(record)  # its produce batch was refused; maybe not for it
            elif isinstance(result, BaseException):
                self._sort(outcome, record, result)
            else:
                outcome.acked.append(record)
            reset = reset or isinstance(result, RESET_ERRORS)
        if reset:
            await self.reset(producer)
        for record in suspects:
            await self._send_alone(record, outcome)
        return outcome

    async def _send_alone(self, record: envelope.Record, outcome: Outcome) -> None:
        """Retry a record of a refused batch on its own: refused again, it is the poison one."""
        producer = self.producer
        try:
            await producer.send_and_wait(
                record.topic, record.value, key=record.key, headers=record.headers
            )
        except aiokafka.errors.KafkaError as exc:
            self._sort(outcome, record, exc)
            if isinstance(exc, RESET_ERRORS):
                await self.reset(producer)
        else:
            outcome.acked.append(record)

    @staticmethod
    def _sort(outcome: Outcome, record: envelope.Record, exc: BaseException) -> None:
        for kind, reason in POISON_ERRORS.items():
            if isinstance(exc, kind):
                outcome.poison.append((record, reason, f"{type(exc).__name__}: {exc}"))
                return
        if isinstance(exc, asyncio.CancelledError):
            raise exc
        outcome.transient.append((record, f"{type(exc).__name__}: {exc}"))

    async def dead_letter(self, rows: Sequence[tuple[envelope.Row, str, str]]) -> int:
        """Copy failed rows (as a small JSON description) to the dead-letter topic, best effort."""
        if not self._dead_letter_topic or not rows:
            return 0
        futures = []
        for row, reason, error in rows:
            value = orjson.dumps(
                {
                    "id": row.id,
                    "message_id": row.message_id,
                    "aggregate_type": row.aggregate_type,
                    "aggregate_id": row.aggregate_id,
                    "event_type": row.event_type,
                    "reason": reason,
                    "error": error,
                }
            )
            headers = [("message_id", row.message_id.encode()), ("reason", reason.encode())]
            futures.append(
                await self.producer.send(
                    self._dead_letter_topic,
                    value,
                    key=row.aggregate_id.encode(),
                    headers=headers,
                )
            )
        results = await asyncio.gather(*futures, return_exceptions=True)
        sent = sum(not isinstance(r, BaseException) for r in results)
        if sent < len(results):
            log.warning(
                "dead_letter_failed", topic=self._dead_letter_topic, lost=len(results) - sent
            )
        return sent
