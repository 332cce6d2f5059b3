"""Fault matrix, relay -> MariaDB through toxiproxy: a black hole longer than the lock wait
timeout, and the connection cut while the answer to the mark step's COMMIT is on its way.

One relay process (the victim) reaches the database through a proxy, as its own database user
(so that its sessions and transactions can be told apart in ``information_schema``); the other
one, the observer of the backlog gauge, through a proxy of its own that is faulted only when
said. Writers connect directly.

**Black hole.** When the proxy goes silent the victim is in the middle of a cycle (the test
waits for that; the victim's producer lingers 0.5 s, so its cycles spend most of their time
publishing with their shard locks held). The server keeps those locks until it drops the silent
session (``idle_transaction_timeout``, set by the relay); the other process skips locked shards,
so the events of those shards wait. Measured: how long until the server releases the victim's
locks, and how long until the other relay has taken the shards over (the backlog younger than
1 s again after it grew older): the goal is 2 x ``RELAY_WORKER__PUBLISH_TIMEOUT_S`` at most. The
black hole lasts until both happened (at least longer than the lock wait timeout, at most the
goal plus 5 s), and the victim must work again afterwards on its own.

**Cut during COMMIT.** With answers from the server delayed by a second (for both relays, so
that the victim still gets its share of the shards), the test watches the
victim's transactions in ``information_schema.INNODB_TRX``: once one that locked rows (a claim
that owns shards; its cycle ends with the mark and the COMMIT sent as one statement, so the
modified rows are never seen before the COMMIT) has vanished while its session lives on, the
server has executed the COMMIT whose answer is still in the proxy; the proxy then cuts every
connection (deleted and made again on its port), so the relay cannot know whether its mark
committed.
Done three times. (toxiproxy's reset_peer toxic cannot do this: it acts only when data flows,
and adding any toxic flushes what a latency toxic holds.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import chaos
import cluster
import proxies
import pytest
from servers import MariaDB

from relay import config, db
from relay.tools import polling

pytestmark = [pytest.mark.fault, pytest.mark.slow]

PUBLISH_TIMEOUT_S = float(cluster.RELAY_SETTINGS["worker__publish_timeout_s"])
LOCK_WAIT_TIMEOUT_S = 5.0  # RELAY_WORKER__LOCK_WAIT_TIMEOUT_S (default)
TAKEOVER_GOAL_S = 2 * PUBLISH_TIMEOUT_S
BLACK_HOLE_MAX_S = TAKEOVER_GOAL_S + 5.0  # measured beyond the goal, so a miss has a figure
VICTIM_RECOVERY_S = 60.0
# The victim's producer waits this long before sending: its cycles hold their shard locks
# mostly while publishing, as a relay publishing big batches does, so the black hole finds it
# holding locks.
VICTIM_LINGER_S = 0.5
# toxiproxy passes the victim's close on to the server (a real black hole passes nothing): when
# the relay gives up on a statement (RELAY_DB__CALL_TIMEOUT_S, 15 s by default) and closes its
# connection, the server would see it and release the locks. The victim waits longer than the
# black hole lasts, so only the server's own timeout can release them, as in a real black hole.
VICTIM_CALL_TIMEOUT_S = BLACK_HOLE_MAX_S + 30.0

COMMIT_CUTS = 3
ANSWER_DELAY_MS = 1000
# InnoDB refreshes INNODB_TRX only when nobody read it for 0.1 s: poll more slowly than that.
TRX_POLL_S = 0.15
MARK_RETRIES = 'outbox_relay_batch_retries_total{reason="mark"}'

VICTIM_STATE = (
    "SELECT p.ID, t.trx_id, t.trx_rows_locked"
    " FROM information_schema.PROCESSLIST p"
    " LEFT JOIN information_schema.INNODB_TRX t ON t.trx_mysql_thread_id = p.ID"
    " WHERE p.USER = %s"
)


@dataclasses.dataclass(frozen=True)
class Trx:
    thread: int
    trx: str
    locked: int


@dataclasses.dataclass(frozen=True)
class VictimState:
    sessions: frozenset[int]
    transactions: tuple[Trx, ...]


class Watcher:
    """The victim's sessions and open transactions, read on one connection of its own."""

    def __init__(self, conn: db.Connection, user: str) -> None:
        self._conn = conn
        self._user = user

    async def state(self) -> VictimState:
        async with self._conn.cursor() as cur:
            await cur.execute(VICTIM_STATE, (self._user,))
            rows = await cur.fetchall()
        return VictimState(
            frozenset(int(r[0]) for r in rows),
            tuple(Trx(int(r[0]), str(r[1]), int(r[2])) for r in rows if r[1]),
        )


@dataclasses.dataclass(frozen=True)
class Setup:
    matrix: cluster.Matrix
    victim_proxy: proxies.Proxy  # relay-1's way to the database
    observer_proxy: proxies.Proxy  # relay-0's (no toxic unless a test adds one)
    watcher: Watcher


@contextlib.asynccontextmanager
async def _victim_setup(
    case: str,
    mariadb: MariaDB,
    kafka_cluster: cluster.Cluster,
    toxiproxy: proxies.Toxiproxy,
    database: str,
    *,
    workdir: Path,
    victim_settings: Mapping[str, str | int | float] | None = None,
) -> AsyncIterator[Setup]:
    """The matrix with relay-0 (the observer) and relay-1 (the victim, as its own database
    user) each through a proxy of its own, once the victim publishes."""
    with chaos.database_user(mariadb, database) as (user, password):
        async with (
            toxiproxy.proxy("mariadb_observer", mariadb.address) as observer_proxy,
            toxiproxy.proxy("mariadb_victim", mariadb.address) as victim_proxy,
        ):
            observer: dict[str, str | int | float] = {
                "db__host": "127.0.0.1",
                "db__port": observer_proxy.port,
            }
            victim = observer | {
                "db__port": victim_proxy.port,
                "db__user": user,
                "db__password": password,
                **(victim_settings or {}),
            }
            async with cluster.matrix(
                case, mariadb, kafka_cluster, database, workdir, per_process=(observer, victim)
            ) as m:
                settings: config.Settings = m.scenario.settings
                async with db.connection(settings) as conn:
                    await wait_victim_publishes(m)
                    yield Setup(m, victim_proxy, observer_proxy, Watcher(conn, user))


VictimSetup = Callable[..., contextlib.AbstractAsyncContextManager[Setup]]


@pytest.fixture
def victim_setup(
    mariadb: MariaDB,
    kafka_cluster: cluster.Cluster,
    toxiproxy: proxies.Toxiproxy,
    database: str,
    tmp_path: Path,
) -> VictimSetup:
    """``victim_setup(case, victim_settings=None)``: the matrix of :func:`_victim_setup` on this
    test's servers and database, working in its ``tmp_path``."""

    def setup(
        case: str, victim_settings: Mapping[str, str | int | float] | None = None
    ) -> contextlib.AbstractAsyncContextManager[Setup]:
        return _victim_setup(
            case,
            mariadb,
            kafka_cluster,
            toxiproxy,
            database,
            workdir=tmp_path,
            victim_settings=victim_settings,
        )

    return setup


async def wait_victim_publishes(m: cluster.Matrix) -> float:
    """Until the victim's published counter rises; the seconds it took."""
    return await chaos.wait_moving(m.relays[1], VICTIM_RECOVERY_S)


async def test_database_black_hole_longer_than_the_lock_wait(victim_setup: VictimSetup) -> None:
    async with victim_setup(
        "c1-db-black-hole",
        victim_settings={
            "kafka__linger_s": VICTIM_LINGER_S,
            "db__call_timeout_s": VICTIM_CALL_TIMEOUT_S,
        },
    ) as setup:
        m, proxy, watcher = setup.matrix, setup.victim_proxy, setup.watcher

        async def victim_locks() -> bool:
            return any(t.locked for t in (await watcher.state()).transactions)

        await polling.wait_until(victim_locks, "the victim to hold locks", 30, TRX_POLL_S)
        async with m.fault("relay->MariaDB black hole (one of the two relays)") as fault:
            async with proxy.black_hole():
                stuck = [t for t in (await watcher.state()).transactions if t.locked]
                released_s, takeover_s = await _watch_takeover(m, watcher, fault.started)
            fault.figures |= {
                "victim_trx_open": len(stuck),
                "victim_rows_locked": sum(t.locked for t in stuck),
                "locks_released_s": _figure(released_s),
                "takeover_s": _figure(takeover_s),
                "goal_s": TAKEOVER_GOAL_S,
            }
        fault.figures["victim_back_s"] = round(await wait_victim_publishes(m), 1)
        record = await m.recovered(fault)
        await m.finish("relay->MariaDB black hole")
        # the black hole caught the victim holding locks, which it could not release itself
        assert stuck, "the black hole caught the victim with no transaction open"
        assert released_s > LOCK_WAIT_TIMEOUT_S, f"the victim's locks held only {released_s} s"
        missed = (
            f"the other relay took the victim's shards over {_figure(takeover_s)} s after the"
            f" black hole began (goal: 2 x publish timeout = {TAKEOVER_GOAL_S:g} s); the server"
            f" released the victim's locks after {_figure(released_s)} s; {record.line()}"
        )
        assert _idle_timeout_s(m) < TAKEOVER_GOAL_S  # what the relay asks of the server
        assert takeover_s <= TAKEOVER_GOAL_S, missed


def _idle_timeout_s(m: cluster.Matrix) -> float:
    """The idle_transaction_timeout the relay sets, for the relays' publish timeout."""
    settings: config.Settings = m.scenario.settings
    worker = settings.worker.model_copy(update={"publish_timeout_s": PUBLISH_TIMEOUT_S})
    return db.idle_transaction_timeout_s(settings.model_copy(update={"worker": worker}))


async def _watch_takeover(
    m: cluster.Matrix, watcher: Watcher, started: float
) -> tuple[float, float]:
    """While the black hole lasts: seconds until the server holds no transaction of the victim,
    and until the observer's backlog, having grown to 1 s or older, is younger than 1 s again
    (BLACK_HOLE_MAX_S when it did not happen by then)."""
    released = takeover = math.nan
    window = 2 * cluster.SAMPLE_INTERVAL_S

    async def measured() -> bool:
        nonlocal released, takeover
        now = time.monotonic()
        if math.isnan(released) and not (await watcher.state()).transactions:
            released = now - started
        if math.isnan(takeover):
            stalled = [s.at for s in m.samples if s.at >= started and s.age_s >= 1.0]
            fresh = [
                s.at for s in m.samples if stalled and s.at >= stalled[0] + window and s.age_s < 1.0
            ]
            if fresh:
                takeover = fresh[0] - started
        elapsed = now - started
        done = not math.isnan(released) and not math.isnan(takeover)
        return (done and elapsed > LOCK_WAIT_TIMEOUT_S) or elapsed >= BLACK_HOLE_MAX_S

    await polling.wait_until(measured, "the takeover", BLACK_HOLE_MAX_S + 10, TRX_POLL_S)
    return (
        BLACK_HOLE_MAX_S if math.isnan(released) else released,
        BLACK_HOLE_MAX_S if math.isnan(takeover) else takeover,
    )


def _figure(value: float) -> str:
    return f">{BLACK_HOLE_MAX_S:g}" if value >= BLACK_HOLE_MAX_S else f"{value:.1f}"


async def test_database_cut_during_the_mark_commit(victim_setup: VictimSetup) -> None:
    async with victim_setup("c2-db-cut-in-commit") as setup:
        m, proxy, watcher = setup.matrix, setup.victim_proxy, setup.watcher
        victim = m.relays[1]
        name = f"relay->MariaDB cut while the mark COMMIT's answer is on its way, x{COMMIT_CUTS}"
        async with m.fault(name, count=COMMIT_CUTS) as fault:
            for _ in range(COMMIT_CUTS):
                # both relays get their answers late (the victim must get a share of the work)
                async with setup.observer_proxy.latency(ANSWER_DELAY_MS):
                    await proxy.add_toxic("latency", attributes={"latency": ANSWER_DELAY_MS})
                    thread = await _wait_commit_executed(watcher)
                    # every connection of the proxy is cut: the COMMIT's answer, still delayed
                    # in it, is lost (the proxy comes back at once, without the latency)
                    await proxy.cut()
                    await _wait_session_gone(watcher, thread)
        fault.figures["victim_back_s"] = round(await wait_victim_publishes(m), 1)
        failed_marks = cluster.labelled(await victim.metrics(), MARK_RETRIES)
        fault.figures["victim_mark_steps_failed"] = int(failed_marks)
        await m.recovered(fault)
        await m.finish("relay->MariaDB cut during COMMIT")
        # each cut broke a mark step (its COMMIT), which the relay saw fail
        assert failed_marks >= COMMIT_CUTS, f"{failed_marks} failed mark steps\n{victim.tail()}"


async def _wait_session_gone(watcher: Watcher, thread: int) -> None:
    async def gone() -> bool:
        return thread not in (await watcher.state()).sessions

    await polling.wait_until(gone, "the victim's session to be cut", 10, 0.02)


async def _wait_commit_executed(watcher: Watcher) -> int:
    """Until a transaction of the victim that locked rows (a claim owning shards) is gone from
    INNODB_TRX while its session lives: the server executed the mark and its COMMIT, whose
    answer is still delayed in the proxy (a claim that ends otherwise, by a rollback after a
    failed publish, is not a failed mark step: the final assertion would catch the mistake).
    Returns the session's thread id."""
    marking: dict[str, int] = {}  # trx id -> thread id
    committed: list[int] = []

    async def executed() -> bool:
        state = await watcher.state()
        open_now = {t.trx for t in state.transactions}
        for trx, thread in list(marking.items()):
            if trx not in open_now:
                del marking[trx]
                if thread in state.sessions:
                    committed.append(thread)
        marking.update({t.trx: t.thread for t in state.transactions if t.locked})
        return bool(committed)

    await polling.wait_until(executed, "the victim's mark step to commit", 60, TRX_POLL_S)
    return committed[0]
