"""Tooling around the daemon: ``relay demo``, ``relay bench`` and the parts the tests share.

Nothing of the daemon imports this package; ``relay.cli`` imports it only inside the ``demo`` and
``bench`` commands. It needs the ``tools`` extra (psutil): ``pip install 'outbox-relay[tools]'``.

* :mod:`relay.tools.stats`: the delivery bookkeeping (latency, loss, duplicates, order); pure.
* :mod:`relay.tools.loadgen`: the workload, Service A writers, preloads, the raw Kafka ceiling.
* :mod:`relay.tools.writerpool`: Service A's writers in several processes (``--writer-processes``).
* :mod:`relay.tools.consumer`: Service B, a consumer feeding :class:`stats.Tracker`.
* :mod:`relay.tools.database` and :mod:`relay.tools.sql`: every statement the tools run.
* :mod:`relay.tools.topics`: create (and wait for leaders) and delete topics.
* :mod:`relay.tools.processes`: ``relay run`` as a child process, its metrics, CPU and memory.
* :mod:`relay.tools.polling` and :mod:`relay.tools.net`: ``wait_until``, a free port, HTTP GET.
* :mod:`relay.tools.bench`: the two commands.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from relay import config

EXTRA = "tools"
NEEDS = ("psutil",)


def missing_extra(command: str) -> str | None:
    """One line telling how to install what ``relay <command>`` needs, or None when present."""
    if all(importlib.util.find_spec(name) is not None for name in NEEDS):
        return None
    return f"relay {command} needs the {EXTRA} extra: pip install 'outbox-relay[{EXTRA}]'"


async def run(command: str, settings: config.Settings, args: argparse.Namespace) -> int:
    """``relay demo`` or ``relay bench``; exit code 1 with one line when the extra is missing."""
    problem = missing_extra(command)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    from relay.tools import bench  # noqa: PLC0415 - needs the extra checked above

    return await (bench.demo if command == "demo" else bench.main)(settings, args)
