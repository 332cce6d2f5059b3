"""The cleaner loop: deletes published rows older than the retention, one replica at a time.

Each run takes a MySQL named lock (``GET_LOCK``) on its own connection; replicas that do not get
it skip the run. Published rows are found in small chunks through ``ix_clean`` (status,
published_at), then skipped rows (by ``resolved_at``; they are few), and deleted in primary-key
order, one short transaction per chunk. New, held and failed rows are never touched: every
delete requires the row's final status.
"""

from __future__ import annotations

import asyncio

import structlog

from relay import config, db, metrics, pacing, store

log = structlog.get_logger(__name__)


class Cleaner:
    def __init__(self, settings: config.Settings, stop: asyncio.Event) -> None:
        self._settings = settings
        self._cleaner = settings.cleaner
        self._store = store.Store(settings.outbox.table, settings.db.call_timeout_s)
        self._stop = stop
        self.lock_name = f"outbox-relay-cleaner:{settings.db.name}.{settings.outbox.table}"

    async def run(self) -> None:
        """Run every ``interval_s`` until stopped; see :func:`relay.pacing.periodic` for errors."""
        await pacing.periodic("cleaner", self._stop, self._cleaner.interval_s, self._run_counted)

    async def _run_counted(self) -> None:
        try:
            await self.run_once()
        except Exception:
            metrics.cleaner_runs.labels("error").inc()
            raise

    async def run_once(self) -> int | None:
        """One run. Returns rows deleted, or None if another replica holds the cleaner lock."""
        async with db.connection(self._settings, autocommit=False) as conn:
            if not await self._store.try_cleaner_lock(conn, self.lock_name):
                metrics.cleaner_runs.labels("skipped").inc()
                return None
            try:
                deleted = await self._delete_chunks(conn)
            finally:
                await self._store.release_cleaner_lock(conn, self.lock_name)
        metrics.cleaner_runs.labels("done").inc()
        if deleted:
            log.info("cleaner_deleted", rows=deleted)
        return deleted

    async def _delete_chunks(self, conn: db.Connection) -> int:
        """Published rows, then skipped ones: one statement per status, each on its index."""
        total = 0
        chunks = 0
        for status in ("published", "skipped"):
            while chunks < self._cleaner.max_chunks_per_run and not self._stop.is_set():
                chunks += 1
                deleted = await self._store.delete_expired(
                    conn, self._cleaner.retention_s, self._cleaner.chunk_size, status
                )
                total += deleted
                metrics.cleaner_deleted.inc(deleted)
                if deleted < self._cleaner.chunk_size:
                    break
        return total
