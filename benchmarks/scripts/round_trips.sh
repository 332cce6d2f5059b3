#!/usr/bin/env bash
# Count a relay process's socket writes per destination port for a while: the round trips of
# its cycles, independent of the machine's speed (one write per MariaDB statement or Kafka
# request). Divide by the claims counted meanwhile (outbox_relay_claim_duration_seconds_count
# on its /metrics) for the round trips per cycle. Needs strace (Debian package `strace`) and
# ptrace rights over the process (root, or the same user with ptrace_scope 0).
#
#   bash benchmarks/scripts/round_trips.sh <relay pid> [seconds, default 10]
#
# Prints lines like `write 3307 807`: syscall, the peer's port (or the fd when it is not a TCP
# socket), count.
set -euo pipefail

pid="$1"
seconds="${2:-10}"
trace="$(mktemp)"
trap 'rm -f "$trace"' EXIT

timeout "$seconds" strace -f -qq -e trace=write,writev,sendto,sendmsg -p "$pid" -o "$trace" || true

python3 - "$pid" "$trace" <<'PY'
import collections
import os
import re
import subprocess
import sys

pid, trace = sys.argv[1], sys.argv[2]
port_of_inode = {}
for line in subprocess.run(["ss", "-tnpe"], capture_output=True, text=True, check=True).stdout.splitlines():
    inode = re.search(r"ino:(\d+)", line)
    if inode:
        port_of_inode[inode.group(1)] = line.split()[4].rsplit(":", 1)[1]
port_of_fd = {}
for fd in os.listdir(f"/proc/{pid}/fd"):
    try:
        socket = re.match(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
    except OSError:
        continue
    if socket:
        port_of_fd[fd] = port_of_inode.get(socket.group(1), f"fd{fd}")
counts = collections.Counter()
with open(trace) as lines:
    for line in lines:
        call = re.match(r"\d+\s+(\w+)\((\d+),", line)
        if call:
            counts[(call.group(1), port_of_fd.get(call.group(2), f"fd{call.group(2)}"))] += 1
for (syscall, peer), count in counts.most_common():
    print(syscall, peer, count)
PY
