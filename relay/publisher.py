"""The idempotent Kafka producer and the publishing of one batch of records.

Every record of a batch gets one :class:`Result`, by position:

- ``ACKED``: Kafka acknowledged it;
- ``POISON``: it can never be published as it is (too large, invalid topic, rejected);
- ``HOLD``: an operational error that concerns its topic (missing, not authorized, a broker
  policy): its aggregate waits behind a timed hold while other aggregates flow;
- ``RETRY``: a passing failure (timeout, broker unavailable): the row stays new;
- ``NOT_SENT``: never handed to the producer: the row stays new, no attempt counted.

Batches: the records of one call are handed to the producer as produce batches of their own,
one per topic-partition (the producer's partitioner's choice, by key): one acknowledgement per
batch instead of one future per record. The producer queues a handed-over batch as it is (after
``RELAY_KAFKA__LINGER_S``) and never adds records of another call to it, so another worker's
records never share a batch's fate. A batch's verdict is the verdict of each of its records.

Ordering: records join their batch in the call's order; nothing is enqueued after an enqueue
failure, and nothing of an aggregate that already failed in this call. A batch that fills up is
handed over before the next one of its partition opens. Records of a produce batch the broker
refused as too large are retried one by one, in order, on a producer of their own that nothing
else uses, so that another worker's records can never join the retry; after the first refusal
of an aggregate its later records are not sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import ssl
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import aiokafka
import aiokafka.errors
import aiokafka.partitioner
import aiokafka.record.default_records
import orjson
import structlog

from relay import config, envelope, errors

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
    aiokafka.errors.CorruptRecordException: "rejected",
    aiokafka.errors.UnsupportedForMessageFormatError: "rejected",
}


class Status(enum.Enum):
    ACKED = "acked"
    POISON = "poison"
    HOLD = "hold"
    RETRY = "retry"
    NOT_SENT = "not_sent"


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    status: Status
    reason: str = ""  # bounded: a metric label
    error: str = ""


ACKED = Result(Status.ACKED)
NOT_SENT = Result(Status.NOT_SENT)


def sort(exc: BaseException) -> Result:
    """The result of a record whose send or acknowledgement raised ``exc``."""
    if isinstance(exc, asyncio.CancelledError):
        raise exc
    for kind, reason in POISON_ERRORS.items():
        if isinstance(exc, kind):
            return Result(Status.POISON, reason, errors.one_line(exc))
    if isinstance(exc, errors.KAFKA_OPERATIONAL):
        return Result(Status.HOLD, "kafka_refused", errors.one_line(exc))
    return Result(Status.RETRY, "kafka", errors.one_line(exc))


class Publishing(Protocol):
    """What a worker needs of a publisher (the real one, or an in-memory fake in tests)."""

    @property
    def started(self) -> bool: ...

    async def publish(self, records: Sequence[envelope.Record]) -> list[Result]: ...

    async def dead_letter(self, rows: Sequence[tuple[envelope.Row, str, str]]) -> str | None: ...


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
        options["ssl_context"] = ssl_context(settings)
    if settings.sasl_mechanism:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        if settings.sasl_password is not None:
            options["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    return options


def ssl_context(settings: config.KafkaSettings) -> ssl.SSLContext:
    """The TLS context of ``RELAY_KAFKA__SSL_*``: the server's certificate checked against
    ``ssl_cafile`` (the system's CAs without it), and its host name unless
    ``ssl_check_hostname`` is false; a client certificate (mTLS) from ``ssl_certfile``. TLS 1.2
    or later. Raises ConfigError naming the variable when a file cannot be used."""
    try:
        context = ssl.create_default_context(cafile=settings.ssl_cafile)
    except (OSError, ssl.SSLError) as exc:
        raise errors.ConfigError(
            f"invalid configuration: RELAY_KAFKA__SSL_CAFILE: cannot load {settings.ssl_cafile}:"
            f" {_tls_reason(exc)}"
        ) from None
    context.check_hostname = settings.ssl_check_hostname
    if settings.ssl_certfile:
        password = settings.ssl_key_password
        try:
            context.load_cert_chain(
                settings.ssl_certfile,
                settings.ssl_keyfile,
                password.get_secret_value() if password is not None else None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise errors.ConfigError(
                "invalid configuration: RELAY_KAFKA__SSL_CERTFILE/RELAY_KAFKA__SSL_KEYFILE"
                f"/RELAY_KAFKA__SSL_KEY_PASSWORD: cannot load {settings.ssl_certfile}"
                f"{', ' + settings.ssl_keyfile if settings.ssl_keyfile else ''}:"
                f" {_tls_reason(exc)}"
            ) from None
    return context


async def connect_problem(settings: config.KafkaSettings) -> str | None:
    """Why the bootstrap servers refuse a connection, in one line, or None when one takes it.

    aiokafka raises only "Unable to bootstrap from [...]" when no bootstrap server lets it in
    and logs the reason (a certificate that does not verify, a SASL password that is wrong);
    this opens one connection per server with the producer's own options to find it out.
    """
    from aiokafka import conn as kafka_conn  # noqa: PLC0415 - only when something failed

    options = producer_options(settings)
    problems = []
    for host, port, _ in kafka_conn.collect_hosts(settings.bootstrap_servers, randomize=False):
        try:
            conn = await kafka_conn.create_conn(
                host,
                port,
                client_id=settings.client_id,
                request_timeout_ms=options["request_timeout_ms"],
                ssl_context=options.get("ssl_context"),
                security_protocol=settings.security_protocol,
                sasl_mechanism=options.get("sasl_mechanism"),
                sasl_plain_username=options.get("sasl_plain_username"),
                sasl_plain_password=options.get("sasl_plain_password"),
            )
        except Exception as exc:  # noqa: BLE001 - what the broker said is the answer
            problems.append(f"{host}:{port}: {_tls_reason(exc)}")
        else:
            conn.close()
            return None
    return "; ".join(problems) or "no bootstrap server"


def _tls_reason(exc: BaseException) -> str:
    """``certificate verify failed: unable to get local issuer certificate``, say."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"TLS: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"TLS: {exc.reason.lower().replace('_', ' ')}"
    return errors.one_line(exc)


class Publisher:
    """One idempotent producer per process, shared by its workers, and a second one, used only
    to retry the records of a refused produce batch one by one."""

    def __init__(
        self,
        settings: config.Settings,
        producer_factory: Callable[[], aiokafka.AIOKafkaProducer] | None = None,
    ) -> None:
        self._settings = settings
        self._factory = producer_factory or (
            lambda: aiokafka.AIOKafkaProducer(**producer_options(settings.kafka))
        )
        self._producer: aiokafka.AIOKafkaProducer | None = None
        self._solo: aiokafka.AIOKafkaProducer | None = None
        self._dead_letter_topic = settings.outbox.dead_letter_topic
        self._reset_lock = asyncio.Lock()
        self._solo_lock = asyncio.Lock()
        self._unsettled: set[asyncio.Future[Any]] = set()
        self._max_request_bytes = settings.kafka.max_request_bytes
        self.resets = 0

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def start(self) -> None:
        self._producer = await self._new_producer()

    async def _new_producer(self) -> aiokafka.AIOKafkaProducer:
        producer = self._factory()
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    async def reset(self, broken: aiokafka.AIOKafkaProducer) -> None:
        """Replace ``broken`` by a new producer, once, however many workers ask."""
        async with self._reset_lock:
            if broken == self._solo:
                self._solo = None
            elif broken == self._producer:
                log.warning("producer_reset")
                self.resets += 1
                self._producer = await self._new_producer()
            else:
                return  # already replaced (or stopped)
        await broken.stop()

    async def stop(self) -> None:
        """Flush what is buffered and close."""
        producers = [self._producer, self._solo]
        self._producer = self._solo = None
        for producer in producers:
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

    async def publish(self, records: Sequence[envelope.Record]) -> list[Result]:
        """Send the records in order and wait for each verdict; the caller bounds the time.

        Raises KafkaError when the cluster cannot be asked which topics exist (nothing was sent
        then).
        """
        if self._unsettled:
            # Records of an earlier cycle that timed out are still in the producer: send nothing
            # more until Kafka settled them, so memory stays bounded while a broker stalls.
            await asyncio.wait(self._unsettled)
        results = [NOT_SENT] * len(records)
        missing = await self.missing_topics({r.topic for r in records})
        producer = self.producer
        pending = await self._enqueue(producer, records, missing, results)
        outcomes = await self._settle([f for _, f in pending])
        suspects: list[int] = []
        reset = False
        for (positions, _), outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, TOO_LARGE_ERRORS):
                suspects += positions  # the produce batch was refused; maybe not for each
            else:
                result = sort(outcome) if isinstance(outcome, BaseException) else ACKED
                for i in positions:
                    results[i] = result
            reset = reset or isinstance(outcome, RESET_ERRORS)
        if reset:
            await self.reset(producer)
        if suspects:
            suspects.sort()
            await self._send_alone([records[i] for i in suspects], suspects, results)
        return results

    async def _enqueue(
        self,
        producer: aiokafka.AIOKafkaProducer,
        records: Sequence[envelope.Record],
        missing: set[str],
        results: list[Result],
    ) -> list[tuple[list[int], asyncio.Future[Any]]]:
        """Hand the records to the producer in order, batched by topic-partition; the rule of
        the module's docstring. Returns each handed-over batch's positions and future."""
        partitions: dict[str, list[int] | Result] = {}  # a topic's, or why there are none
        stopped: set[envelope.AggregateKey] = set()
        filling: dict[tuple[str, int], _Batch] = {}
        pending: list[tuple[list[int], asyncio.Future[Any]]] = []
        for i, record in enumerate(records):
            if record.aggregate in stopped:
                continue
            tp = await self._route(producer, record, missing, partitions)
            if isinstance(tp, Result):
                results[i] = tp
                stopped.add(record.aggregate)
                if tp.status is Status.RETRY:
                    break  # the cluster's trouble: nothing more this cycle
                continue  # the record's or its topic's: its aggregate waits, the others flow
            batch = filling.get(tp)
            if batch is None:
                batch = filling[tp] = _Batch(producer.create_batch())
            if not batch.add(record, i):  # full: hand it over, and open the partition's next
                del filling[tp]
                if not await self._hand_over(producer, tp, batch, pending, results):
                    return pending
                batch = filling[tp] = _Batch(producer.create_batch())
                batch.add(record, i)  # a batch takes its first record, whatever its size
        for tp, batch in filling.items():
            if not await self._hand_over(producer, tp, batch, pending, results):
                break
        return pending

    async def _route(
        self,
        producer: aiokafka.AIOKafkaProducer,
        record: envelope.Record,
        missing: set[str],
        partitions: dict[str, list[int] | Result],
    ) -> tuple[str, int] | Result:
        """The record's topic-partition, or why it cannot be sent (``partitions`` caches each
        topic's partitions, or the reason it has none)."""
        if record.topic in missing:
            error = f"topic {record.topic!r} does not exist"
            return Result(Status.HOLD, "unknown_topic", error)
        size = _SIZE(record.key, record.value, record.headers)
        if size > self._max_request_bytes:
            return sort(
                aiokafka.errors.MessageSizeTooLargeError(
                    f"the record is {size} bytes serialized, over the maximum request size"
                    f" (RELAY_KAFKA__MAX_REQUEST_BYTES={self._max_request_bytes})"
                )
            )
        known = partitions.get(record.topic)
        if known is None:
            try:
                known = sorted(await producer.partitions_for(record.topic))
            except aiokafka.errors.KafkaError as exc:  # not authorized, no metadata
                known = sort(exc)
            partitions[record.topic] = known
        if isinstance(known, Result):
            return known
        return (record.topic, _partition(record.key, known))

    async def _hand_over(
        self,
        producer: aiokafka.AIOKafkaProducer,
        tp: tuple[str, int],
        batch: _Batch,
        pending: list[tuple[list[int], asyncio.Future[Any]]],
        results: list[Result],
    ) -> bool:
        """Give ``batch`` to the producer; False (its records' results set) if it refused.

        The builder stays open: aiokafka sends a closed batch at once, without the linger. Only
        ``send()`` could add to it, which the relay uses for dead-letter copies alone."""
        try:
            future = await producer.send_batch(batch.builder, tp[0], partition=tp[1])
        except aiokafka.errors.KafkaError as exc:
            result = sort(exc)
            for i in batch.positions:
                results[i] = result
            return False  # the producer is in trouble: nothing more this cycle
        self._track(future)
        pending.append((batch.positions, future))
        return True

    def _track(self, future: asyncio.Future[Any]) -> None:
        """Keep a handed-over batch's future in ``_unsettled`` until it settles: a cancellation
        (the caller's timeout), during the hand-over of a later batch or while waiting, leaves
        it there instead of cancelling it, since its records are in the producer anyway."""
        self._unsettled.add(future)
        future.add_done_callback(self._unsettled.discard)
        future.add_done_callback(_retrieved)  # settled after a timeout: nobody else looks

    @property
    def unsettled(self) -> int:
        """Batches handed to the producer whose verdict has not come yet."""
        return len(self._unsettled)

    @staticmethod
    async def _settle(futures: list[asyncio.Future[Any]]) -> list[object]:
        """Wait for every future (tracked since its hand-over); the outcome of each."""
        if futures:
            await asyncio.wait(futures)
        return [_outcome(f) for f in futures]

    async def _send_alone(
        self, records: Sequence[envelope.Record], positions: Sequence[int], results: list[Result]
    ) -> None:
        """Retry the records of refused batches one at a time, in order, on the solo producer:
        refused again, a record is the poison one, and its aggregate's later records wait."""
        async with self._solo_lock:
            refused: set[envelope.AggregateKey] = set()
            for record, i in zip(records, positions, strict=True):
                if record.aggregate in refused:
                    continue  # NOT_SENT: behind a refused record of its aggregate
                if self._solo is None:
                    self._solo = await self._new_producer()
                solo = self._solo
                try:
                    await solo.send_and_wait(**_message(record))
                except aiokafka.errors.KafkaError as exc:
                    results[i] = sort(exc)
                    refused.add(record.aggregate)
                    if isinstance(exc, RESET_ERRORS):
                        await self.reset(solo)
                else:
                    results[i] = ACKED

    async def dead_letter(self, rows: Sequence[tuple[envelope.Row, str, str]]) -> str | None:
        """Copy failed rows (as a small JSON description) to the dead-letter topic.

        Returns None when every copy was acknowledged (or there is no dead-letter topic), else
        the reason, for the rows' ``last_error``. Never raises a Kafka error.
        """
        if not self._dead_letter_topic or not rows:
            return None
        try:
            if await self.missing_topics({self._dead_letter_topic}):
                return f"dead-letter topic {self._dead_letter_topic!r} does not exist"
            futures = [
                await self.producer.send(
                    self._dead_letter_topic,
                    _dead_letter_value(row, reason, error),
                    key=row.aggregate_id.encode(),
                    headers=[("message_id", row.message_id.encode()), ("reason", reason.encode())],
                )
                for row, reason, error in rows
            ]
            await asyncio.gather(*futures)
        except aiokafka.errors.KafkaError as exc:
            return f"dead-letter copy failed: {errors.one_line(exc)}"
        return None


# A record's serialized size, as the producer's own check computes it.
_SIZE = aiokafka.record.default_records.DefaultRecordBatchBuilder.estimate_size_in_bytes
_PARTITIONER = aiokafka.partitioner.DefaultPartitioner()


def _partition(key: bytes, partitions: Sequence[int]) -> int:
    """The partition the producer's default partitioner gives ``key`` (murmur2, as Java's)."""
    return _PARTITIONER(key, partitions, partitions)  # type: ignore[no-any-return]


@dataclasses.dataclass(slots=True)
class _Batch:
    """The records of one call bound for one topic-partition, in a producer's batch builder."""

    builder: Any  # aiokafka.producer.message_accumulator.BatchBuilder
    positions: list[int] = dataclasses.field(default_factory=list)

    def add(self, record: envelope.Record, position: int) -> bool:
        """Append ``record``; False when the batch is full (it is then closed)."""
        added = self.builder.append(
            timestamp=record.timestamp_ms,
            key=record.key,
            value=record.value,
            headers=record.headers,
        )
        if added is None:
            return False
        self.positions.append(position)
        return True


def _message(record: envelope.Record) -> dict[str, Any]:
    """The producer's ``send`` arguments for a record."""
    return {
        "topic": record.topic,
        "value": record.value,
        "key": record.key,
        "headers": record.headers,
        "timestamp_ms": record.timestamp_ms,
    }


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _outcome(future: asyncio.Future[Any]) -> object:
    """The acknowledgement, or the exception, of a settled send."""
    if future.cancelled():
        return aiokafka.errors.KafkaTimeoutError("the send was cancelled")
    return future.exception() or future.result()


def _dead_letter_value(row: envelope.Row, reason: str, error: str) -> bytes:
    return orjson.dumps(
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
