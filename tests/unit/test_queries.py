"""Named SQL statements: every name the store uses exists, list binding, identifier validation."""

from __future__ import annotations

import inspect
import re

import pytest

from relay import config, queries, store

QUERY_NAMES = {
    "session_isolation",
    "session_time_zone",
    "session_lock_wait",
    "session_idle_transaction_timeout",
    "session_wait_timeout",
    "claim_shards",
    "has_work",
    "claim_shard_heads",
    "claim_rows",
    "due_holds",
    "holds_of",
    "park_rows",
    "unpark_aggregate",
    "insert_hold",
    "update_hold",
    "open_hold",
    "delete_hold",
    "count_shard_holds",
    "mark_published",
    "mark_published_commit",
    "mark_failed",
    "note_attempt",
    "backlog_count",
    "failed_count",
    "held_count",
    "hold_counts",
    "backlog_oldest_age",
    "cleaner_lock",
    "cleaner_unlock",
    "expired_ids",
    "expired_skipped_ids",
    "delete_ids",
    "failed_rows",
    "row_by_id",
    "hold_of",
    "holds_list",
    "lock_shard_wait",
    "replay_row",
    "skip_row",
    "insert_event",
    "ping",
    "server_version",
    "table_indexes",
    "table_columns",
    "shard_rows",
    "current_grants",
    "schema_version",
    "column_type",
    "column_default",
    "table_names",
    "topics_of_new_rows",
}
SCHEMA_NAMES = {
    "create_outbox",
    "create_outbox_shard",
    "seed_outbox_shard",
    "create_outbox_hold",
    "create_outbox_meta",
    "record_schema_version",
}
UPGRADE_NAMES = {
    "outbox_statuses_v2",
    "outbox_resolved_v2",
    "shard_holds_v2",
    "published_at_default",
}


def test_expected_names_exist() -> None:
    assert set(queries.load("queries.sql", "outbox").statements) == QUERY_NAMES
    assert set(queries.load("schema.sql", "outbox").statements) == SCHEMA_NAMES
    assert set(queries.load("upgrade.sql", "outbox").statements) == UPGRADE_NAMES


def test_every_name_the_store_uses_exists() -> None:
    source = inspect.getsource(store)
    used = set(re.findall(r'(?:_execute|_rows|_scalar)\(\s*\w+,\s*"(\w+)"', source))
    used |= set(re.findall(r'self\.sql\["(\w+)"\]', source))
    assert len(used) >= 20  # the patterns above really match the store's calls
    assert used == QUERY_NAMES  # nothing missing, nothing dead


def test_statements_are_clean_single_statements() -> None:
    for filename in ("queries.sql", "schema.sql", "upgrade.sql"):
        for name, sql in queries.load(filename, "outbox").statements.items():
            assert sql, name
            assert not sql.rstrip().endswith(";"), name
            # one statement each; the one exception is the mark sent with its COMMIT
            assert ";" not in sql or name == "mark_published_commit", name
            assert "{outbox" not in sql, name
            assert "{candidates}" not in sql or name == "claim_rows", name
            assert not any(line.lstrip().startswith("--") for line in sql.splitlines()), name


def test_table_names_are_quoted_and_substituted() -> None:
    q = queries.load("queries.sql", "events_v2")
    assert "FROM `events_v2`" in q["claim_shard_heads"]
    assert "FROM `events_v2_shard`" in q["claim_shards"]
    assert "FROM `events_v2_hold`" in q["holds_of"]
    assert "FROM `events_v2_meta`" in q["schema_version"]
    assert "`outbox`" not in q["claim_shard_heads"]
    schema = queries.load("schema.sql", "events_v2")
    assert "CREATE TABLE IF NOT EXISTS `events_v2` (" in schema["create_outbox"]
    assert "CREATE TABLE IF NOT EXISTS `events_v2_shard` (" in schema["create_outbox_shard"]


def test_parameters_of_claim_and_mark() -> None:
    q = queries.load("queries.sql", "outbox")
    assert set(re.findall(r"%\((\w+)\)s", q["claim_shard_heads"])) == {"shard", "limit"}
    assert set(re.findall(r"%\((\w+)\)s", q["claim_rows"])) == {"max_bytes"}
    # the shard lock makes the worker the only claimer: the row read must not lock (or walk)
    # rows of other shards
    assert "FOR UPDATE" not in q["claim_shard_heads"] + q["claim_rows"]
    assert q["claim_shards"].endswith("ORDER BY s.shard\nLIMIT %(limit)s\nFOR UPDATE SKIP LOCKED")
    assert set(re.findall(r"%\((\w+)\)s", q["claim_shards"])) == {"low", "high", "limit"}
    assert set(re.findall(r"%\((\w+)\)s", q["mark_published"])) == {"ids"}
    # the combined mark is the plain mark followed by the COMMIT, nothing else
    assert q["mark_published_commit"] == q["mark_published"] + ";\nCOMMIT"
    assert "status = %(status)s" in q["delete_ids"]


def test_schema_shards_match_the_store() -> None:
    schema = queries.load("schema.sql", "outbox")
    assert f"CRC32(aggregate_id) % {store.SHARDS}" in schema["create_outbox"]
    assert f"shard < {store.SHARDS - 1}" in schema["seed_outbox_shard"]
    for index in store.EXPECTED_INDEXES - {"PRIMARY"}:
        assert f"KEY {index} " in schema["create_outbox"]


def test_schema_text_is_a_runnable_script() -> None:
    text = queries.schema_text("outbox")
    assert text.count(";\n") == len(SCHEMA_NAMES)
    assert "INSERT INTO `outbox_meta`" in text  # a DBA running the script records the version
    assert text.index("CREATE TABLE IF NOT EXISTS `outbox` (") < text.index("INSERT IGNORE")


# ------------------------------------------------------------------ bind


def test_bind_expands_lists() -> None:
    sql, params = queries.bind(
        "SELECT 1 FROM t WHERE id IN %(ids)s AND x = %(x)s LIMIT %(limit)s",
        {"ids": (7, 8, 9), "x": "a", "limit": 5},
    )
    assert sql == (
        "SELECT 1 FROM t WHERE id IN (%(ids__0)s, %(ids__1)s, %(ids__2)s) AND x = %(x)s"
        " LIMIT %(limit)s"
    )
    assert params == {"ids__0": 7, "ids__1": 8, "ids__2": 9, "x": "a", "limit": 5}


def test_bind_accepts_lists_and_single_items() -> None:
    sql, params = queries.bind("WHERE id IN %(ids)s", {"ids": [1]})
    assert sql == "WHERE id IN (%(ids__0)s)"
    assert params == {"ids__0": 1}


def test_bind_does_not_touch_a_similar_name() -> None:
    sql, params = queries.bind("WHERE id = %(id)s OR id IN %(ids)s", {"id": 1, "ids": (2, 3)})
    assert sql == "WHERE id = %(id)s OR id IN (%(ids__0)s, %(ids__1)s)"
    assert params == {"id": 1, "ids__0": 2, "ids__1": 3}


def test_bind_never_puts_values_in_the_statement() -> None:
    evil = "1); DROP TABLE outbox; --"
    sql, params = queries.bind("WHERE id IN %(ids)s", {"ids": (evil,)})
    assert evil not in sql
    assert params == {"ids__0": evil}


def test_bind_rejects_empty_list() -> None:
    with pytest.raises(ValueError, match="empty list"):
        queries.bind("WHERE id IN %(ids)s", {"ids": ()})


# ------------------------------------------------------------------ identifiers


@pytest.mark.parametrize(
    "name",
    ["x`; DROP TABLE users; --", "outbox`", "out box", "1outbox", "", "db.outbox", "a" * 65],
)
def test_table_name_injection_is_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="identifier"):
        queries.quote(name)
    with pytest.raises(ValueError, match="identifier"):
        queries.load("queries.sql", name)
    with pytest.raises(config.ConfigError, match="RELAY_OUTBOX__TABLE"):
        config.load(outbox={"table": name})


def test_longest_table_name_leaves_room_for_shard_table() -> None:
    name = "a" * 58
    q = queries.load("queries.sql", name)
    assert f"`{name}_shard`" in q["claim_shards"]
    assert len(f"{name}_shard") <= 64  # MySQL's identifier limit


def test_union_all_numbers_the_repeated_parameter() -> None:
    block = "(SELECT id FROM t WHERE shard = %(shard)s LIMIT %(limit)s)"
    sql = queries.union_all(block, "shard", 3)
    assert sql.count("UNION ALL") == 2
    assert re.findall(r"%\((\w+)\)s", sql) == [
        "shard__0", "limit", "shard__1", "limit", "shard__2", "limit",
    ]  # fmt: skip


def test_table_name_leaving_no_room_for_the_shard_table_is_rejected() -> None:
    with pytest.raises(ValueError, match="identifier"):
        queries.load("queries.sql", "a" * 59)
