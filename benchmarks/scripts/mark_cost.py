"""MariaDB's own CPU per 1,000 rows for the claim and for variants of the mark UPDATE.

Not part of the relay: a measurement behind benchmarks/README.md ("What bounds the drain").
It fills a scratch database ``outbox_mark_cost`` with 50,000 new rows of ~1.1 KB JSON for each
variant, then runs 30 claim (``claim_rows`` over 16 shards, ~1,000 rows) + UPDATE + COMMIT
cycles, reading the server process's CPU time (so it must run on the database's machine).

    .venv/bin/python benchmarks/scripts/mark_cost.py [variant:keep|noclean|unstamped|minimal ...]

Variants: ``full`` (the relay's mark_published), ``status-published_at`` (no attempts or
last_error), ``status`` (status only: an update in place of the index entries), ``attempts``
(attempts only: no index changes); ``noclean`` drops ix_clean first, ``unstamped`` gives
published_at no default (NULL until the mark, as before the ``published_at_default`` upgrade),
``minimal`` logs the claim and mark with ``binlog_row_image = MINIMAL`` (the server's default
here is FULL: whole rows, before and after).
Environment: MARK_COST_PORT (3307), MARK_COST_USER / MARK_COST_PASSWORD (relay_admin).
"""

from __future__ import annotations

import os
import sys
import time

import psutil
import pymysql

from relay import queries, store

DATABASE = "outbox_mark_cost"
ROWS = 50_000
CYCLES = 30
UPDATES = {
    "full": store.Store("outbox").sql["mark_published"],
    "status-published_at": "UPDATE outbox SET status = 'published',"
    " published_at = CURRENT_TIMESTAMP(6) WHERE id IN %(ids)s AND status = 'new'",
    "status": "UPDATE outbox SET status = 'published' WHERE id IN %(ids)s AND status = 'new'",
    "attempts": "UPDATE outbox SET attempts = attempts + 1 WHERE id IN %(ids)s AND status = 'new'",
}


def server_cpu_s(server: psutil.Process) -> float:
    times = server.cpu_times()
    return float(times.user + times.system)


def fill(cur: pymysql.cursors.Cursor, table: str) -> None:
    cur.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
    cur.execute(f"CREATE DATABASE {DATABASE}")
    cur.execute(f"USE {DATABASE}")
    for statement in store.Store("outbox").schema.statements.values():
        cur.execute(statement)
    if table == "noclean":
        cur.execute("ALTER TABLE outbox DROP INDEX ix_clean")
    elif table == "unstamped":  # tables created before published_at had a default
        cur.execute("ALTER TABLE outbox ALTER COLUMN published_at SET DEFAULT NULL")
    for _ in range(ROWS // 10_000):
        cur.execute(
            "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, after_state)"
            " SELECT UUID(), 'account', CONCAT('acc-', seq MOD 1000), 'updated',"
            " JSON_OBJECT('n', seq, 'pad', REPEAT('x', 1100)) FROM seq_1_to_10000"
        )
        cur.connection.commit()


def main(variants: list[str]) -> None:
    server = next(p for p in psutil.process_iter(["name"]) if p.info["name"] == "mariadbd")
    conn = pymysql.connect(
        host="127.0.0.1",
        port=int(os.environ.get("MARK_COST_PORT", "3307")),
        user=os.environ.get("MARK_COST_USER", "relay_admin"),
        password=os.environ.get("MARK_COST_PASSWORD", "relay_admin"),
    )
    cur = conn.cursor()
    sql = store.Store("outbox").sql
    heads = queries.union_all(sql["claim_shard_heads"], "shard", 16)
    claim = queries.nest(sql["claim_rows"], "{candidates}", heads)
    for variant in variants:
        update, _, indexes = variant.partition(":")
        fill(cur, indexes)
        image = "MINIMAL" if indexes == "minimal" else "FULL"
        cur.execute("SET SESSION binlog_row_image = %s", (image,))
        time.sleep(3)  # let the fill's background work settle
        claim_cpu = mark_cpu = 0.0
        rows = 0
        for i in range(CYCLES):
            params: dict[str, object] = {f"shard__{j}": (i * 16 + j) % 64 for j in range(16)}
            params.update(limit=63, max_bytes=16 << 20)
            c0 = server_cpu_s(server)
            cur.execute(claim, params)
            ids = tuple(r[0] for r in cur.fetchall())
            c1 = server_cpu_s(server)
            cur.execute(UPDATES[update], {"ids": ids})
            conn.commit()
            claim_cpu += c1 - c0
            mark_cpu += server_cpu_s(server) - c1
            rows += len(ids)
        sys.stdout.write(
            f"{variant:28} server CPU per 1,000 rows: claim {claim_cpu / rows * 1e6:5.1f} ms,"
            f" mark + COMMIT {mark_cpu / rows * 1e6:5.1f} ms ({rows} rows)\n"
        )
    cur.execute(f"DROP DATABASE {DATABASE}")


if __name__ == "__main__":
    main(
        sys.argv[1:]
        or [
            "full:keep",
            "full:minimal",
            "full:unstamped",
            "full:noclean",
            "status-published_at:unstamped",
            "status:keep",
            "attempts:keep",
        ]
    )
