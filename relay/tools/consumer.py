"""Service B: reads every partition of a topic from the beginning (no consumer group) and
records each delivery in a :class:`relay.tools.stats.Tracker`."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import aiokafka
import aiokafka.errors
import structlog

from relay import config
from relay.tools import loadgen, polling, stats, topics

log = structlog.get_logger(__name__)

KAFKA_RETRY_S = 0.2  # the broker may be away (restarted on purpose): read again after this


class Consumer:
    """``async with Consumer(...)``: reading in a background task until the block ends."""

    def __init__(
        self,
        settings: config.Settings,
        topic: str,
        partitions: int,
        workload: loadgen.Workload,
        tracker: stats.Tracker,
    ) -> None:
        self._consumer = aiokafka.AIOKafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            **topics.client_options(settings),
        )
        self._partitions = [aiokafka.TopicPartition(topic, p) for p in range(partitions)]
        self._workload = workload
        self._tracker = tracker
        self._task: asyncio.Task[None] | None = None
        self.next_offsets: dict[int, int] = {}
        self.errors: list[str] = []
        self.last_receipt = math.nan

    async def __aenter__(self) -> Consumer:
        await self._consumer.start()
        try:
            self._consumer.assign(self._partitions)
            await self._consumer.seek_to_beginning(*self._partitions)
        except BaseException:
            await self._consumer.stop()
            raise
        self._task = asyncio.create_task(self._run(), name="service-b")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await polling.cancel(self._task)
        await self._consumer.stop()

    async def _run(self) -> None:
        tracker = self._tracker
        prefix = self._workload.prefix
        while True:
            try:
                batches = await self._consumer.getmany(
                    *self._partitions, timeout_ms=100, max_records=10_000
                )
            except aiokafka.errors.KafkaError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(KAFKA_RETRY_S)
                continue
            now = time.monotonic()
            for tp, messages in batches.items():
                for message in messages:
                    mid = next((v for k, v in message.headers if k == "message_id"), b"")
                    index = stats.parse_message_id(prefix, bytes(mid).decode())
                    tracker.received(index, now, tp.partition)
                if messages:
                    self.next_offsets[tp.partition] = messages[-1].offset + 1
            if batches:
                self.last_receipt = now

    def _check_running(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()  # raises what it died of
            raise RuntimeError("the consumer stopped")

    async def wait_delivered(self, timeout_s: float, committed_before: float = math.inf) -> float:
        """Until every message committed before ``committed_before`` (monotonic clock; default:
        all so far and all that commit meanwhile) arrived; returns the seconds it took."""
        started = time.monotonic()

        def delivered() -> bool:
            self._check_running()
            return self._tracker.pending(committed_before) == 0

        try:
            await polling.wait_until(delivered, "deliveries", timeout_s, 0.1)
        except TimeoutError:
            lost = self._tracker.summary().lost_examples[:5]
            ids = [self._workload.message_id(i) for i in lost]
            raise TimeoutError(
                f"{self._tracker.pending(committed_before)} committed messages not delivered "
                f"after {timeout_s:g} s, e.g. {ids}; consumer errors: {self.errors[-3:]}"
            ) from None
        return time.monotonic() - started

    async def wait_caught_up(self, timeout_s: float = 60.0) -> None:
        """Until this consumer has read up to the current end of every partition."""
        ends: dict[Any, int] = await self._consumer.end_offsets(self._partitions)

        def caught_up() -> bool:
            self._check_running()
            return all(self.next_offsets.get(tp.partition, 0) >= end for tp, end in ends.items())

        await polling.wait_until(caught_up, "the consumer to reach the end offsets", timeout_s)
