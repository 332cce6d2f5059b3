"""A private single-node Kafka broker for one test, for faults that must not touch the shared one.

Built like deploy/local/servers.sh builds the project's broker (the same jars, KRaft storage
formatted with ``kafka.tools.StorageTool``, ``kafka.Kafka <server.properties>``), but with free
ports, its own data directory, a small heap and a C1-only JIT for a start of about 3 s::

    async with private_kafka.broker(tmp_path / "kafka") as broker:
        await topics.create(broker.kafka.options, "t", 6, configs={"max.message.bytes": "20000"})
        broker.freeze()  # SIGSTOP: sockets stay open, nothing answers (a GC pause, a hung disk)
        broker.thaw()  # SIGCONT

The broker is always killed when the block exits (and, through PR_SET_PDEATHSIG, when the test
process dies). A broker that cannot start raises RuntimeError: the test fails, never skips.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import dataclasses
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from servers import REPO_ROOT, Kafka

from relay.tools import net, processes, topics

KAFKA_POM = REPO_ROOT / "deploy" / "local" / "kafka" / "pom.xml"
READY_TOPIC = "_private_ready"

SERVER_PROPERTIES = """\
node.id=1
process.roles=broker,controller
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.quorum.voters=1@127.0.0.1:{controller_port}
log.dirs={data}
num.partitions=1
default.replication.factor=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
delete.topic.enable=true
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
"""

LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = STDOUT
"""

# Fast start on 2 cores: the C1 compiler only, a small serial-collected heap.
JVM_OPTIONS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Djava.awt.headless=true")


def kafka_libs() -> Path:
    """The jars deploy/local/servers.sh fetched (``~/.cache/outbox-relay/kafka-<v>/libs``)."""
    match = re.search(r"<kafka.version>(.+?)</kafka.version>", KAFKA_POM.read_text())
    if match is None:
        raise RuntimeError(f"no <kafka.version> in {KAFKA_POM}")
    libs = Path.home() / ".cache" / "outbox-relay" / f"kafka-{match.group(1)}" / "libs"
    if not any(libs.glob("kafka_*.jar")):
        raise RuntimeError(f"no Kafka jars in {libs}: run `bash deploy/local/servers.sh up kafka`")
    return libs


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies (Linux PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))


@dataclasses.dataclass
class PrivateKafka(processes.ChildProcess):
    bootstrap: str
    workdir: Path
    popen: subprocess.Popen[bytes]
    start_s: float = 0.0  # from launching the formatter to the first acknowledged record

    @property
    def kafka(self) -> Kafka:
        return Kafka(self.bootstrap)

    def freeze(self) -> None:
        """SIGSTOP the broker: connections stay open, requests go unanswered."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    async def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM (after SIGCONT, in case it is frozen); SIGKILL after ``timeout_s``."""
        if self.alive:
            self.thaw()
            self.popen.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.popen.wait, timeout_s)
        self.kill()
        return self.popen.wait()

    def kill(self) -> None:
        if self.alive:
            self.popen.kill()  # SIGKILL works on a stopped process too
        self.popen.wait()

    def tail(self, lines: int = 40) -> str:
        path = self.workdir / "kafka.log"
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
        return f"---- last lines of {path} ----\n" + "\n".join(text)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def _roundtrip(bootstrap: str) -> None:
    """The readiness probe: a topic is created and an idempotent producer gets an ack."""
    with contextlib.suppress(KafkaError):  # TopicAlreadyExists after a half-failed attempt
        await topics.create({"bootstrap_servers": bootstrap}, READY_TOPIC, 1, timeout_s=10.0)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, request_timeout_ms=5000
    )
    await producer.start()
    try:
        await producer.send_and_wait(READY_TOPIC, b"ready")
    finally:
        await producer.stop()


def _launch(libs: Path, workdir: Path, heap_mb: int, config: Mapping[str, str]) -> PrivateKafka:
    """Write the configuration, format the storage, start ``kafka.Kafka`` (not ready yet)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, controller_port = net.free_port(), net.free_port()
    properties = SERVER_PROPERTIES.format(
        port=port, controller_port=controller_port, data=workdir / "data"
    )
    properties += "".join(f"{k}={v}\n" for k, v in config.items())
    (workdir / "server.properties").write_text(properties)
    (workdir / "log4j2.properties").write_text(LOG4J2)
    java = [  # the machine's java, as deploy/local/servers.sh uses it
        "java",
        *JVM_OPTIONS,
        f"-Dlog4j2.configurationFile={workdir / 'log4j2.properties'}",
        "-cp",
        f"{libs}/*",
    ]
    cluster_id = "-"
    while cluster_id.startswith("-"):  # Kafka's Uuid.randomUuid(), as servers.sh makes it
        cluster_id = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
    properties_path = str(workdir / "server.properties")
    formatted = subprocess.run(  # noqa: S603 - fixed argv
        [
            *java,
            "-Xmx128m",
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            "--cluster-id",
            cluster_id,
            "--config",
            properties_path,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if formatted.returncode != 0:
        output = formatted.stdout + formatted.stderr
        raise RuntimeError(f"StorageTool format exited {formatted.returncode}: {output}")
    with (workdir / "kafka.log").open("wb") as log:
        popen = subprocess.Popen(  # noqa: S603 - fixed argv
            [*java, f"-Xmx{heap_mb}m", "-Xms64m", "kafka.Kafka", properties_path],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, before exec
        )
    return PrivateKafka(f"127.0.0.1:{port}", workdir, popen)


async def _wait_ready(broker: PrivateKafka, deadline: float) -> None:
    port = int(broker.bootstrap.rpartition(":")[2])
    problem = "port not open"
    while True:
        if not broker.alive:
            raise RuntimeError(f"private Kafka exited {broker.popen.returncode}\n{broker.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"private Kafka not ready ({problem})\n{broker.tail()}")
        if _port_open(port):
            try:
                async with asyncio.timeout(15):
                    await _roundtrip(broker.bootstrap)
            except (KafkaError, OSError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                return
        await asyncio.sleep(0.1)


async def start(
    workdir: Path,
    *,
    heap_mb: int = 384,
    config: Mapping[str, str] | None = None,
    timeout_s: float = 90.0,
) -> PrivateKafka:
    """Format and launch a broker in ``workdir``; return once it acknowledges a record.

    ``config``: extra or overriding server properties. Raises RuntimeError (broker killed) when
    it cannot start within ``timeout_s``."""
    started = time.monotonic()
    broker = await asyncio.to_thread(_launch, kafka_libs(), workdir, heap_mb, dict(config or {}))
    try:
        await _wait_ready(broker, started + timeout_s)
    except BaseException:
        broker.kill()
        raise
    broker.start_s = time.monotonic() - started
    return broker


@contextlib.asynccontextmanager
async def broker(
    workdir: Path,
    *,
    heap_mb: int = 384,
    config: Mapping[str, str] | None = None,
    timeout_s: float = 90.0,
) -> AsyncIterator[PrivateKafka]:
    """A private broker for the block; killed at exit whatever happens (frozen or not)."""
    kafka = await start(workdir, heap_mb=heap_mb, config=config, timeout_s=timeout_s)
    try:
        yield kafka
    finally:
        kafka.kill()
