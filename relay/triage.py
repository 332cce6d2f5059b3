"""Failed rows and held aggregates: what ``relay failed``, ``relay replay`` and ``relay skip`` do.

Releasing a hold must not race the worker that owns the aggregate's shard: each release takes
the shard's lock *without* SKIP LOCKED (it waits for the owner's cycle to end; the lock wait
exceeds the publish timeout), changes the row and the hold, and commits, in one transaction.
"""

from __future__ import annotations

import dataclasses
import datetime
import getpass
import json
import socket

from relay import config, db, envelope, store


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    failed: list[store.FailedRow]
    holds: list[store.HoldInfo]


@dataclasses.dataclass(slots=True)
class Outcome:
    changed: int = 0
    released: int = 0  # holds ended
    notes: list[str] = dataclasses.field(default_factory=list)


def operator_name() -> str:
    """Who runs the command, for the skipped row's ``resolved_by``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


async def report(settings: config.Settings, limit: int) -> Report:
    s = store.Store(settings.outbox.table)
    async with db.connection(settings) as conn:
        return Report(await s.failed_rows(conn, limit), await s.hold_list(conn, limit))


async def replay(settings: config.Settings, ids: list[int] | None, limit: int) -> Outcome:
    """Failed rows back to new (the given ones, or up to ``limit``), their holds released."""
    return await _each_failed(settings, ids, limit, action="replay", who="")


async def skip(settings: config.Settings, ids: list[int], who: str) -> Outcome:
    """Give up on failed rows (status skipped, who and when recorded), their holds released."""
    return await _each_failed(settings, ids, len(ids), action="skip", who=who)


async def release(settings: config.Settings, aggregates: list[envelope.AggregateKey]) -> Outcome:
    """End the holds of aggregates (whose failed row is gone, say): their rows flow again."""
    s = store.Store(settings.outbox.table)
    outcome = Outcome()
    async with _connection(settings) as conn:
        for key in aggregates:
            hold = await s.hold_of(conn, key)
            if hold is None:
                outcome.notes.append(f"{key[0]}:{key[1]}: not held")
                continue
            shard = hold[2]
            await s.lock_shard_wait(conn, shard)
            await s.delete_hold(conn, key, shard)
            await s.count_holds(conn, shard)
            await conn.commit()
            outcome.released += 1
    return outcome


async def _each_failed(
    settings: config.Settings, ids: list[int] | None, limit: int, *, action: str, who: str
) -> Outcome:
    s = store.Store(settings.outbox.table)
    outcome = Outcome()
    async with _connection(settings) as conn:
        if ids is None:
            ids = [row.id for row in await s.failed_rows(conn, limit)]
            await conn.rollback()
        for row_id in ids:
            row = await s.row(conn, row_id)
            if row is None:
                outcome.notes.append(f"row {row_id}: no such row")
                continue
            _, aggregate_type, aggregate_id, shard, _ = row
            await s.lock_shard_wait(conn, shard)  # waits for the shard's owner
            if action == "replay":
                changed = await s.replay_row(conn, row_id)
            else:
                changed = await s.skip_row(conn, row_id, who)
            if not changed:
                await conn.rollback()
                outcome.notes.append(f"row {row_id}: not failed (status {row[4]})")
                continue
            key = (aggregate_type, aggregate_id)
            hold = await s.hold_of(conn, key)
            if hold is not None and hold[0] == "poison" and hold[1] == row_id:
                await s.delete_hold(conn, key, shard)
                await s.count_holds(conn, shard)
                outcome.released += 1
            await conn.commit()
            outcome.changed += 1
    return outcome


def _connection(settings: config.Settings) -> db.ConnectionContext:
    # The shard's owner may be in the middle of a cycle bounded by the publish timeout.
    wait_s = settings.worker.publish_timeout_s + settings.worker.lock_wait_timeout_s
    return db.connection(settings, autocommit=False, lock_wait_timeout_s=wait_s)


def render_table(report: Report) -> str:
    lines = [f"failed rows: {len(report.failed)}"]
    if report.failed:
        lines.append(f"{'id':>10}  {'aggregate':<40} {'event_type':<24} {'tries':>5}  last_error")
        lines += [
            f"{r.id:>10}  {_short(f'{r.aggregate_type}:{r.aggregate_id}', 40):<40} "
            f"{_short(r.event_type, 24):<24} {r.attempts:>5}  {_short(r.last_error or '', 80)}"
            for r in report.failed
        ]
    lines.append(f"held aggregates: {len(report.holds)}")
    if report.holds:
        lines.append(f"{'kind':<7} {'aggregate':<40} {'row':>10} {'waiting':>7}  reason / retry")
        lines += [
            f"{h.kind:<7} {_short(f'{h.aggregate_type}:{h.aggregate_id}', 40):<40} "
            f"{h.failed_id or '-':>10} {h.held_rows:>7}  "
            f"{_short(h.reason or '', 60)}{f' (retry at {h.retry_at})' if h.retry_at else ''}"
            for h in report.holds
        ]
    return "\n".join(lines)


def render_json(report: Report) -> str:
    doc = {
        "failed": [dataclasses.asdict(r) for r in report.failed],
        "holds": [
            {
                **dataclasses.asdict(h),
                "retry_at": _iso(h.retry_at),
                "created_at": _iso(h.created_at),
            }
            for h in report.holds
        ],
    }
    return json.dumps(doc, indent=2)


def _iso(value: object) -> str | None:
    return value.isoformat() if isinstance(value, datetime.datetime) else None


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
