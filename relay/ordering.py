"""The ordering rule: what to record for a claimed batch, given each record's result. Pure.

Rows are walked in id order, aggregate by aggregate (``(aggregate_type, aggregate_id)``):

- an acknowledged row is marked published as long as no earlier row of its aggregate failed in
  this batch;
- the first row of an aggregate that is not acknowledged *breaks* the aggregate: no later row of
  it is marked published in this cycle, whatever its own result;
- what a break records depends on its cause:

  - poison, policy ``hold``: the row is marked failed and the aggregate held; its later rows
    of the batch are parked (status held) until an operator releases the hold;
  - poison, policy ``skip``: the row is marked failed and the aggregate does *not* break (the
    failed row leaves a gap, as documented);
  - an operational error of the record's topic (missing, not authorized): the aggregate gets a
    timed hold and the row and its later rows are parked until the hold's retry time;
  - a passing failure (timeout, broker trouble): the row stays new with the attempt noted;
  - not sent: the row stays new, nothing recorded.

Rows left new are claimed again, in id order, by a later cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from relay import envelope, publisher


@dataclasses.dataclass(frozen=True, slots=True)
class NewHold:
    key: envelope.AggregateKey
    shard: int
    kind: str  # "poison" or "timed"
    failed_id: int | None
    reason: str


@dataclasses.dataclass(slots=True)
class Plan:
    """What one cycle records, in one transaction."""

    published: list[envelope.Row] = dataclasses.field(default_factory=list)
    failed: list[tuple[envelope.Row, str, str]] = dataclasses.field(default_factory=list)
    holds: list[NewHold] = dataclasses.field(default_factory=list)
    parked: list[int] = dataclasses.field(default_factory=list)
    retried: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    untouched: list[int] = dataclasses.field(default_factory=list)

    @property
    def only_published(self) -> bool:
        """Whether recording the plan is marking rows published and nothing else."""
        return bool(self.published) and not (
            self.failed or self.holds or self.parked or self.retried
        )

    @property
    def broken(self) -> bool:
        """Whether some row was left for a later cycle by a passing failure."""
        return bool(self.retried) or bool(self.untouched)


def plan(
    rows: Sequence[envelope.Row],
    results: Mapping[int, publisher.Result],
    on_poison: str,
) -> Plan:
    """Apply the rule to ``rows`` (id order) with ``results`` by row id."""
    out = Plan()
    broken: dict[envelope.AggregateKey, str] = {}  # aggregate -> "park" or "leave"
    for row in rows:
        key = row.aggregate
        result = results.get(row.id, publisher.NOT_SENT)
        after = broken.get(key)
        if after == "park":
            out.parked.append(row.id)
            continue
        if after == "leave":
            out.untouched.append(row.id)
            continue
        status = result.status
        if status is publisher.Status.ACKED:
            out.published.append(row)
        elif status is publisher.Status.POISON:
            out.failed.append((row, result.reason, result.error))
            if on_poison == "hold":
                broken[key] = "park"
                out.holds.append(
                    NewHold(key, row.shard, "poison", row.id, f"{result.reason}: {result.error}")
                )
        elif status is publisher.Status.HOLD:
            broken[key] = "park"
            out.parked.append(row.id)
            out.holds.append(
                NewHold(key, row.shard, "timed", None, f"{result.reason}: {result.error}")
            )
        elif status is publisher.Status.RETRY:
            broken[key] = "leave"
            out.retried.append((row.id, f"{result.reason}: {result.error}"))
        else:
            broken[key] = "leave"
            out.untouched.append(row.id)
    return out
