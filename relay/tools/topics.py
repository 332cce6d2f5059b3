"""Kafka topics for the tools and the tests: create (and wait for leaders), describe, delete.

``options`` are client connection options: :func:`client_options` of the relay's settings, or
just ``{"bootstrap_servers": "host:port"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import aiokafka.admin
import aiokafka.errors

from relay import config, publisher

ADMIN_TIMEOUT_MS = 10_000


def client_options(settings: config.Settings) -> dict[str, Any]:
    """The relay producer's connection options (servers, TLS, SASL) for admin clients and
    consumers."""
    options = publisher.producer_options(settings.kafka)
    keep = {"bootstrap_servers", "security_protocol", "ssl_context"}
    keep |= {k for k in options if k.startswith("sasl_")}
    return {k: v for k, v in options.items() if k in keep}


@contextlib.asynccontextmanager
async def _admin(options: Mapping[str, Any]) -> AsyncIterator[Any]:
    admin = aiokafka.admin.AIOKafkaAdminClient(
        **{"request_timeout_ms": ADMIN_TIMEOUT_MS, **options}
    )
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


def _raise_errors(action: str, entries: Iterable[Sequence[Any]]) -> None:
    for entry in entries:
        code = int(entry[1])
        if code != 0:
            raise aiokafka.errors.for_code(code)(f"{action} {entry[0]}: {entry}")


async def _described(admin: Any, name: str) -> list[dict[str, Any]] | None:
    """The partitions of ``name`` when the topic and all of them answer without error."""
    described = await admin.describe_topics([name])
    if not described or described[0].get("error_code", 0) != 0:
        return None
    parts: list[dict[str, Any]] = described[0].get("partitions", [])
    return parts if all(p.get("error_code", 0) == 0 for p in parts) else None


def _led(parts: Iterable[Mapping[str, Any]]) -> bool:
    return all(p.get("leader", -1) >= 0 for p in parts)


async def create(
    options: Mapping[str, Any],
    name: str,
    partitions: int,
    *,
    configs: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Create ``name`` (with topic-level ``configs``); return once every partition has a leader."""
    async with _admin(options) as admin, asyncio.timeout(timeout_s):
        topic = aiokafka.admin.NewTopic(
            name=name,
            num_partitions=partitions,
            replication_factor=1,
            topic_configs=dict(configs or {}),
        )
        response = await admin.create_topics([topic])
        _raise_errors("creating topic", response.topic_errors)
        while True:  # metadata until every partition has a leader (bounded by the timeout)
            parts = await _described(admin, name)
            if parts is not None and len(parts) == partitions and _led(parts):
                return
            await asyncio.sleep(0.05)


async def partition_ids(options: Mapping[str, Any], name: str) -> list[int]:
    """The partition numbers of an existing topic (ValueError when it has none)."""
    async with _admin(options) as admin:
        parts = await _described(admin, name)
    if not parts:
        raise ValueError(f"topic {name} has no partitions")
    return sorted(int(p["partition"]) for p in parts)


async def delete(options: Mapping[str, Any], names: Sequence[str]) -> None:
    if not names:
        return
    async with _admin(options) as admin:
        response = await admin.delete_topics(list(names))
        _raise_errors("deleting topic", response.topic_error_codes)
