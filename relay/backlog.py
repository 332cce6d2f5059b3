"""Samples the backlog (new rows, age of the oldest), failed rows and holds into gauges."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from relay import config, db, metrics, pacing, store


class BacklogSampler:
    def __init__(
        self,
        settings: config.Settings,
        stop: asyncio.Event,
        *,
        store_: store.Observing | None = None,
        connect: Callable[[], Awaitable[db.Connection]] | None = None,
    ) -> None:
        self._settings = settings
        self._store: store.Observing = store_ or store.Store(
            settings.outbox.table, settings.db.call_timeout_s
        )
        self._connect = connect or (lambda: db.connect(settings))
        self._stop = stop
        self._conn: db.Connection | None = None

    async def run(self) -> None:
        try:
            await pacing.periodic(
                "backlog", self._stop, self._settings.backlog.sample_interval_s, self._sample
            )
        finally:
            db.close(self._conn)

    async def _sample(self) -> None:
        try:
            await self.sample()
        except Exception:
            db.close(self._conn)  # reconnect at the next tick
            self._conn = None
            raise

    async def sample(self) -> store.Backlog:
        if self._conn is None:
            self._conn = await self._connect()
        backlog = await self._store.backlog(self._conn, self._settings.backlog.count_cap)
        metrics.backlog_rows.set(backlog.new)
        metrics.backlog_oldest_age.set(backlog.oldest_age_s)
        metrics.failed_rows.set(backlog.failed)
        metrics.held_rows.set(backlog.held)
        for kind in metrics.HOLD_KINDS:
            metrics.held_aggregates.labels(kind).set(backlog.holds.get(kind, 0))
        return backlog
