"""Samples the backlog (new rows, age of the oldest) and failed rows into gauges."""

from __future__ import annotations

import asyncio

import structlog

from relay import config, db, metrics, pacing, store

log = structlog.get_logger(__name__)


class BacklogSampler:
    def __init__(self, settings: config.Settings, stop: asyncio.Event) -> None:
        self._settings = settings
        self._store = store.Store(settings.outbox.table)
        self._stop = stop
        self._conn: db.Connection | None = None

    async def run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    await self.sample()
                except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                    metrics.loop_errors.labels("sampler").inc()
                    log.warning("backlog_sample_failed", error=f"{type(exc).__name__}: {exc}")
                    db.close(self._conn)
                    self._conn = None
                await pacing.sleep_unless(self._stop, self._settings.http.backlog_sample_interval_s)
        finally:
            db.close(self._conn)

    async def sample(self) -> tuple[int, float, int]:
        if self._conn is None:
            self._conn = await db.connect(self._settings)
        rows, age_s, failed = await self._store.backlog(
            self._conn, self._settings.http.backlog_count_cap
        )
        metrics.backlog_rows.set(rows)
        metrics.backlog_oldest_age.set(age_s)
        metrics.failed_rows.set(failed)
        return rows, age_s, failed
