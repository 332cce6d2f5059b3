"""Samples the backlog (new rows, age of the oldest) and failed rows into gauges."""

from __future__ import annotations

import asyncio

from relay import config, db, metrics, pacing, store


class BacklogSampler:
    def __init__(self, settings: config.Settings, stop: asyncio.Event) -> None:
        self._settings = settings
        self._store = store.Store(settings.outbox.table)
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

    async def sample(self) -> tuple[int, float, int]:
        if self._conn is None:
            self._conn = await db.connect(self._settings)
        rows, age_s, failed = await self._store.backlog(
            self._conn, self._settings.backlog.count_cap
        )
        metrics.backlog_rows.set(rows)
        metrics.backlog_oldest_age.set(age_s)
        metrics.failed_rows.set(failed)
        return rows, age_s, failed
