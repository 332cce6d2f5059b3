"""Named SQL statements loaded once from the package's ``sql/*.sql`` files.

A file is a sequence of blocks, each starting with a ``-- name: <name>`` line, followed by comment
lines and one statement. Parameters are ``%(name)s`` (bound by the driver). The only text
substituted here is the pair of table names, validated as plain identifiers and backtick-quoted.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import re
from collections.abc import Mapping

from relay import config

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
# The relay's tables: the outbox itself and its companions, named after it.
TABLE_SUFFIXES = ("", "_shard", "_hold", "_meta")


@functools.cache
def _read(filename: str) -> dict[str, str]:
    text = importlib.resources.files("relay").joinpath("sql", filename).read_text("utf-8")
    blocks: dict[str, str] = {}
    parts = _NAME.split(text)
    # parts: [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [ln for ln in body.strip().splitlines() if not ln.lstrip().startswith("--")]
        if name in blocks:
            raise ValueError(f"duplicate query name {name!r} in {filename}")
        blocks[name] = "\n".join(lines).strip()
    return blocks


def quote(identifier: str) -> str:
    if not config.IDENTIFIER.match(identifier):
        raise ValueError(f"not a plain SQL identifier: {identifier!r}")
    return f"`{identifier}`"


@dataclasses.dataclass(frozen=True)
class Queries:
    """The statements of one file with the table names filled in."""

    statements: dict[str, str]

    def __getitem__(self, name: str) -> str:
        return self.statements[name]


@functools.lru_cache(maxsize=4096)
def _expanded(sql: str, key: str, length: int) -> str:
    names = ", ".join(f"%({key}__{i})s" for i in range(length))
    return sql.replace(f"%({key})s", f"({names})")


@functools.lru_cache(maxsize=256)
def union_all(sql: str, key: str, count: int) -> str:
    """``count`` copies of a parenthesised SELECT joined by UNION ALL, ``%(key)s`` numbered."""
    return "\nUNION ALL\n".join(sql.replace(f"%({key})s", f"%({key}__{i})s") for i in range(count))


@functools.lru_cache(maxsize=256)
def nest(sql: str, token: str, inner: str) -> str:
    """``sql`` with the placeholder ``token`` (e.g. ``{candidates}``) replaced by ``inner``,
    another statement of ours; built once per shape."""
    return sql.replace(token, inner)


def bind(sql: str, params: Mapping[str, object]) -> tuple[str, dict[str, object]]:
    """Expand list parameters (``IN %(ids)s``) into one placeholder per item.

    PyMySQL binds scalars only; the statement text gains placeholders, never values.
    """
    bound: dict[str, object] = {}
    for key, value in params.items():
        if isinstance(value, tuple | list):
            if not value:
                raise ValueError(f"empty list bound to %({key})s")
            sql = _expanded(sql, key, len(value))
            bound.update((f"{key}__{i}", item) for i, item in enumerate(value))
        else:
            bound[key] = value
    return sql, bound


@functools.cache
def load(filename: str, table: str) -> Queries:
    if not config.TABLE_NAME.match(table):
        raise ValueError(f"not a plain SQL identifier of at most 58 characters: {table!r}")
    tables = {f"{{outbox{suffix}}}": quote(table + suffix) for suffix in TABLE_SUFFIXES}
    statements = {}
    for name, text in _read(filename).items():
        sql = text
        for token, value in tables.items():
            sql = sql.replace(token, value)
        statements[name] = sql
    return Queries(statements)


def schema_text(table: str) -> str:
    """The schema as a runnable SQL script (for `relay schema`)."""
    schema = load("schema.sql", table)
    return "".join(f"-- {name}\n{sql};\n\n" for name, sql in schema.statements.items())
