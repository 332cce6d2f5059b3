"""Kafka readiness probe for deploy/local/servers.sh: one produce/consume round trip.

Creates topic ``_relay_roundtrip`` (1 partition, RF 1) with the admin client if it is missing,
produces one unique record with an idempotent producer (``acks=all``), reads that exact record
back with a group-less consumer, and exits 0 on success or 1 with the reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

TOPIC = "_relay_roundtrip"


async def ensure_topic(bootstrap: str, timeout_ms: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    await admin.start()
    try:
        if TOPIC in await admin.list_topics():
            return
        response = await admin.create_topics(
            [NewTopic(name=TOPIC, num_partitions=1, replication_factor=1)]
        )
        for topic_error in response.topic_errors:
            error_type = for_code(topic_error[1])
            if topic_error[1] != 0 and error_type is not TopicAlreadyExistsError:
                raise error_type(f"creating {TOPIC}: {topic_error}")
    finally:
        await admin.close()


async def roundtrip(bootstrap: str, timeout_ms: int) -> None:
    await ensure_topic(bootstrap, timeout_ms)
    key = b"roundtrip"
    value = uuid.uuid4().hex.encode()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        request_timeout_ms=timeout_ms,
    )
    await producer.start()
    try:
        meta = await producer.send_and_wait(TOPIC, value=value, key=key)
    finally:
        await producer.stop()

    tp = TopicPartition(TOPIC, meta.partition)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        request_timeout_ms=timeout_ms,
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        while True:  # bounded by the caller's asyncio.timeout
            batches = await consumer.getmany(tp, timeout_ms=1000)
            for record in batches.get(tp, []):
                if record.offset == meta.offset:
                    if record.key != key or record.value != value:
                        raise RuntimeError(
                            f"read back {record.key!r}/{record.value!r}, sent {key!r}/{value!r}"
                        )
                    return
    finally:
        await consumer.stop()


async def main_async(bootstrap: str, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        await roundtrip(bootstrap, timeout_ms=int(timeout_s * 1000 / 2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", default="127.0.0.1:19092")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds for the whole trip")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args()
    try:
        asyncio.run(main_async(args.bootstrap, args.timeout))
    except (KafkaError, OSError, RuntimeError, TimeoutError) as exc:
        sys.stderr.write(f"roundtrip to {args.bootstrap} failed: {type(exc).__name__}: {exc}\n")
        return 1
    if not args.quiet:
        sys.stdout.write(f"roundtrip to {args.bootstrap} ok\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
