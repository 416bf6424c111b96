"""Background service processes recorded by PID: start, wait until they answer, stop.

Each process starts in its own session (process group) with its PID file under
`<state>/run/<name>.json`; stopping signals that group only, so `down` never touches a process
it did not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class StackError(RuntimeError):
    """A component could not be started or stopped; the message says what to do."""


@dataclass
class ProcessSpec:
    name: str
    argv: list[str]
    port: int | None  # None: the process listens on no port of its own (a Ray worker node)
    port_setting: str | None  # the Settings field that moves the port, for error messages
    probe: Callable[[], bool]  # True once the service answers
    env: dict[str, str] | None = None
    extra_ports: dict[str, int] = field(default_factory=dict)  # setting -> port, also checked
    stop_timeout_s: float = 30.0  # grace between TERM and KILL


# Ports for farms started side by side (tests, benchmarks) come from here: above Ray's default
# worker port range (10002-19999) and below Linux's ephemeral range (32768-60999), where Ray's
# own per-node ports (raylet, object manager, agents) and every outgoing connection get theirs.
# A port taken from the ephemeral range could be handed to one of those between being chosen
# and being bound, which is how a Serve proxy once failed to bind its port.
SIDE_BY_SIDE_PORTS = range(20000, 32768)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free on `host` now, from `SIDE_BY_SIDE_PORTS` (outside Ray's worker
    port range and the OS's ephemeral range); for farms started side by side (tests,
    benchmarks)."""
    ports: list[int] = []
    for port in random.sample(SIDE_BY_SIDE_PORTS, len(SIDE_BY_SIDE_PORTS)):
        if port_is_free(host, port):
            ports.append(port)
            if len(ports) == n:
                return ports
    raise StackError(f"fewer than {n} free ports on {host} in {SIDE_BY_SIDE_PORTS}")


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_port(host: str, port: int, setting: str, what: str) -> None:
    if not port_is_free(host, port):
        env = f"BRANDFARM_{setting.upper()}"
        raise StackError(
            f"port {port} on {host} ({what}) is already in use by another process; "
            f"stop that process or set {env} to a free port"
        )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ManagedProcess:
    """One service process of the embedded stack."""

    def __init__(self, spec: ProcessSpec, state_dir: Path, host: str) -> None:
        self.spec = spec
        self.host = host
        self.pidfile = state_dir / "run" / f"{spec.name}.json"
        self.logfile = state_dir / "logs" / f"{spec.name}.log"

    def _record(self) -> dict | None:
        try:
            record = json.loads(self.pidfile.read_text())
            int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return record if pid_alive(int(record["pid"])) else None

    def recorded_pid(self) -> int | None:
        record = self._record()
        return int(record["pid"]) if record else None

    def start(self, timeout_s: float) -> bool:
        """Start unless already running; wait until it answers. True if it was started now."""
        record = self._record()
        if record is not None:
            if record.get("argv") != self.spec.argv:
                raise StackError(
                    f"{self.spec.name} is running (pid {record['pid']}) from an earlier `up` with "
                    "other settings; run `brandfarm down` first"
                )
            self._wait(timeout_s, None)
            return False
        if self.spec.port is not None:
            check_port(self.host, self.spec.port, self.spec.port_setting, self.spec.name)
        for setting, port in self.spec.extra_ports.items():
            check_port(self.host, port, setting, self.spec.name)
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        with self.logfile.open("ab") as log:
            proc = subprocess.Popen(
                self.spec.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.spec.env,
                start_new_session=True,
            )
        self.pidfile.write_text(
            json.dumps({"pid": proc.pid, "port": self.spec.port, "argv": self.spec.argv})
        )
        try:
            self._wait(timeout_s, proc)
        except StackError:
            self.stop()
            raise
        return True

    def _wait(self, timeout_s: float, proc: subprocess.Popen | None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise StackError(
                    f"{self.spec.name} exited with code {proc.returncode} during start-up; "
                    f"log {self.logfile}:\n{log_tail(self.logfile)}"
                )
            if self.spec.probe():
                return
            time.sleep(0.5)
        where = f" on port {self.spec.port}" if self.spec.port is not None else ""
        raise StackError(
            f"{self.spec.name} did not answer{where} within {timeout_s:.0f}s "
            f"(raise BRANDFARM_STARTUP_TIMEOUT_S if the machine is slow); "
            f"log {self.logfile}:\n{log_tail(self.logfile)}"
        )

    def kill(self) -> bool:
        """SIGKILL the recorded process group at once, as a crash would (no grace, nothing
        flushed); the PID file stays, naming a dead process, so the next `start` (or `up`)
        starts it afresh. True if something was killed."""
        pid = self.recorded_pid()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            _reap(pid)
            if not pid_alive(pid) and not _group_alive(pid):
                break
            time.sleep(0.1)
        return True

    def stop(self, timeout_s: float | None = None) -> bool:
        """Stop the recorded process group (TERM, then KILL after `timeout_s`, by default the
        spec's `stop_timeout_s`). True if something was stopped."""
        if timeout_s is None:
            timeout_s = self.spec.stop_timeout_s
        pid = self.recorded_pid()
        self.pidfile.unlink(missing_ok=True)
        if pid is None:
            return False
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return True
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                _reap(pid)
                if not pid_alive(pid) and not _group_alive(pid):
                    return True
                time.sleep(0.2)
        return True


def _reap(pid: int) -> None:
    """Collect the exit status if `pid` is our own child (in-process use, e.g. tests)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
