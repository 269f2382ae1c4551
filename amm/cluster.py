"""``LocalCluster``: an AMM and N worker agents as local subprocesses, for demos and tests.

The processes are started as ``python -m amm_service`` and ``python -m worker_agent`` (never
imported, so the client package stays independent of both). A process counts as started once it
prints its ready line on stdout::

    amm-service ready address=HOST:PORT epoch=N
    amm-agent ready address=HOST:PORT

One thread per pipe keeps reading after that line so the pipes never fill (an ``echo`` that fails
is dropped, not the reading); the last lines of each stream are kept for error messages. Failure
modes handled while starting:

1. the process exits before its ready line: ``ClusterError`` with its exit code and stderr tail;
2. no ready line before the deadline: the process is killed, same error;
3. the agents are serving but not yet registered: ``wait_for_workers`` polls the AMM until they
   are listed, against the same deadline.

Stopping sends SIGINT to the agents first (so they unregister while the AMM still listens; not
SIGTERM, which would have each drain its keys into the others, all on their way out too), then
SIGTERM to the AMM, and SIGKILLs whatever outlives the deadline, or whatever is left if the stop
itself is interrupted. ``stop_worker`` sends SIGTERM by default: one agent leaving drains first.
For fault injection (``benchmarks/chaos.py``), ``add_worker(listen=...)`` restarts an agent on
the address it had, and ``restart_service`` kills the AMM and starts it again on its address,
from its ``state`` file.
Children get their own session, so a terminal's Ctrl-C reaches only the owner, which then stops
them in that order; should the owner die without stopping them (``kill -9``, a closed terminal),
each stops by itself once its lifeline, a pipe only the owner writes to, reads end-of-file
(``amm.base.lifeline``). Since nothing else would ever stop them, each child is registered for
stopping the moment it is spawned: an interrupt or a failure at any point of the start stops the
children already running.

With ``tls=True`` the cluster runs on mutual TLS: a throwaway CA in a private temporary folder
(``Security.temporary``), the AMM as ``amm``, each agent with its own identity ``worker-N``, and
``cluster.security`` the operator's, for clients; the folder goes with the cluster. With
``security=`` an existing certs folder is used instead, its agents sharing the ``agent``
identity. The children never inherit TLS settings from this process's environment: a cluster is
plaintext or TLS as asked, whatever ``AMM_TLS`` says.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import grpc

from amm.base.lifeline import Lifeline
from amm.base.security import Role, Security
from amm.base.security.identity import SHARED_AGENT_NAME
from amm.client import Client
from amm.errors import AmmError

SERVICE_MODULE = "amm_service"
AGENT_MODULE = "worker_agent"
SERVICE_READY = "amm-service ready"
AGENT_READY = "amm-agent ready"
TAIL_LINES = 40
#: What the service (``AMM_*``) and the agents (``AMM_AGENT_*``) read for TLS: left out of the
#: children's inherited environment, so that only ``tls``/``security`` decide.
TLS_VARIABLES = frozenset(
    {
        "AMM_TLS",
        "AMM_TLS_IDENTITY",
        "AMM_TOKEN_LISTEN",
        "AMM_INSECURE",
        "AMM_AGENT_TLS",
        "AMM_AGENT_TLS_IDENTITY",
        "AMM_AGENT_INSECURE",
    }
)


class ClusterError(RuntimeError):
    """A local process could not be started or did not become ready."""


def parse_ready_line(line: str, prefix: str) -> dict[str, str] | None:
    """``key=value`` fields of a ready line starting with ``prefix``; None for any other line."""
    if not line.startswith(prefix):
        return None
    fields = dict(token.split("=", 1) for token in line[len(prefix) :].split() if "=" in token)
    return fields if "address" in fields else None


def format_interval(interval: str | float) -> str:
    """``0.5`` -> ``500ms``: the service's ``--interval`` syntax; strings pass through."""
    if isinstance(interval, str):
        return interval
    return f"{round(interval * 1000)}ms"


class LocalProcess:
    """One child process whose stdout and stderr are drained by threads."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        ready_prefix: str,
        env: Mapping[str, str],
        echo: IO[str] | None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.argv = argv
        self.ready: dict[str, str] | None = None
        self._ready_prefix = ready_prefix
        self._echo = echo
        self._settled = threading.Event()
        self._stdout: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._stderr: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._readers: list[threading.Thread] = []
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
        try:
            self._start_readers()
        except BaseException:
            # Nobody knows this child yet (an interrupt, or no thread to be had), and in its own
            # session it would outlive us: end it here. Pipes without a reader are closed here.
            self.kill()
            for stream in (self.popen.stdout, self.popen.stderr)[len(self._readers) :]:
                if stream is not None:
                    stream.close()
            raise

    def _start_readers(self) -> None:
        """One thread per pipe, stdout first; ``self._readers`` lists those started."""
        for stream, tail, is_stdout in (
            (self.popen.stdout, self._stdout, True),
            (self.popen.stderr, self._stderr, False),
        ):
            reader = threading.Thread(
                target=self._drain,
                args=(stream, tail, is_stdout),
                name=f"{self.name}-{'stdout' if is_stdout else 'stderr'}",
                daemon=True,
            )
            reader.start()
            self._readers.append(reader)

    @property
    def address(self) -> str:
        if self.ready is None:
            raise ClusterError(f"{self.name} is not ready")
        return self.ready["address"]

    def _drain(self, stream: IO[str] | None, tail: collections.deque[str], stdout: bool) -> None:
        if stream is None:
            return
        with stream:
            for raw in stream:
                line = raw.rstrip("\n")
                tail.append(line)
                self._echo_line(line)
                if stdout and self.ready is None:
                    self.ready = parse_ready_line(line, self._ready_prefix)
                    if self.ready is not None:
                        self._settled.set()
        if stdout:
            self._settled.set()

    def _echo_line(self, line: str) -> None:
        """Echo ``line``; on the first failure (say, ``--logs | head`` exited) stop echoing.

        The reader thread must outlive its echo: once it stops reading, the child blocks on a
        full pipe, and before its ready line that looks like a child that never got ready.
        """
        echo = self._echo
        if echo is None:
            return
        try:
            print(f"[{self.name}] {line}", file=echo, flush=True)
        except Exception:
            self._echo = None

    def wait_ready(self, deadline: float) -> str:
        """The process's address once its ready line arrived; ``ClusterError`` otherwise."""
        if not self._settled.wait(max(0.0, deadline - time.monotonic())):
            self.kill()
            raise self._failure("printed no ready line in time")
        if self.ready is None:
            try:
                self.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
            raise self._failure(f"exited with code {self.popen.returncode}")
        return self.ready["address"]

    def _failure(self, what: str) -> ClusterError:
        for reader in self._readers:
            reader.join(timeout=1)
        tail = "\n".join(f"    {line}" for line in self._stderr) or "    (nothing)"
        command = " ".join(self.argv)
        return ClusterError(f"{self.name} {what}\n  command: {command}\n  stderr:\n{tail}")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait()

    def wait(self, timeout: float) -> int:
        """Exit code, SIGKILLing the process if it is still running after ``timeout``."""
        try:
            code = self.popen.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.popen.returncode
        for reader in self._readers:
            reader.join(timeout=1)
        return code


def _stop_all(processes: list[LocalProcess], timeout: float, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to ``processes``, then SIGKILL those still alive after ``timeout``."""
    for process in processes:
        process.signal(sig)
    deadline = time.monotonic() + timeout
    for process in processes:
        process.wait(deadline - time.monotonic())


def _stop_cluster(
    agents: list[LocalProcess],
    service: list[LocalProcess],
    timeout: float,
    line: Lifeline,
    scratch: list[str],
) -> None:
    """Agents first, then the AMM; anything that interrupts the waits kills what is left. Then
    the ``scratch`` folders (a throwaway CA) go.

    ``stop()`` runs once, so a second Ctrl-C while it waits would otherwise leave the AMM (and
    any agent not yet signalled) running in its own session, beyond anyone's reach. The lifeline
    is cut last, once nothing is left to hear it.
    """
    try:
        _stop_all(agents, timeout, signal.SIGINT)  # stop at once: no point draining
        _stop_all(service, timeout)
    except BaseException:
        for process in [*agents, *service]:
            process.signal(signal.SIGKILL)
        for process in [*agents, *service]:
            process.popen.wait()
        raise
    finally:
        line.cut()
        for folder in scratch:
            shutil.rmtree(folder, ignore_errors=True)


class LocalCluster:
    """An AMM and ``n_workers`` agents on this machine; ``stop()`` or ``with`` ends them.

    ``interval`` and ``start`` map to the service's ``--interval`` and ``--start/--no-start``;
    ``state`` to ``--state`` (``:memory:`` by default, so a local cluster remembers nothing);
    ``service_args`` and ``agent_args`` are passed through verbatim; ``env`` extends the
    environment. ``zones`` are handed to the agents in turn (``--zone``): agent ``i`` gets
    ``zones[i % len(zones)]``. ``echo`` receives every output line of the children, prefixed by
    their name. ``tls`` or ``security`` run it on mutual TLS (see the module doc);
    ``cluster.security`` is then what a client presents. ``dashboard`` (``HOST:PORT``) serves
    the AMM's dashboard there; ``cluster.dashboard`` is then its bound address.
    """

    def __init__(
        self,
        n_workers: int = 2,
        *,
        listen: str = "127.0.0.1:0",
        interval: str | float | None = None,
        start: bool | None = None,
        state: str | None = ":memory:",
        service_args: Sequence[str] = (),
        agent_args: Sequence[str] = (),
        zones: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        stop_timeout: float = 10.0,
        echo: IO[str] | None = None,
        security: Security | None = None,
        tls: bool = False,
        dashboard: str | None = None,
    ) -> None:
        self.timeout = timeout
        self.stop_timeout = stop_timeout
        inherited = {k: v for k, v in os.environ.items() if k not in TLS_VARIABLES}
        self._env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._agent_args = list(agent_args)
        self._zones = list(zones)
        self._echo = echo
        self._service: list[LocalProcess] = []
        self._agents: list[LocalProcess] = []
        self._count = 0
        # Children stop by themselves should this process die without stopping them.
        self._lifeline = Lifeline()
        self._scratch: list[str] = []
        self._finalizer = weakref.finalize(
            self,
            _stop_cluster,
            self._agents,
            self._service,
            stop_timeout,
            self._lifeline,
            self._scratch,
        )
        #: Each agent gets an identity of its own (we own the CA), else the shared one.
        self._issue_agents = False
        if security is None and tls:
            self._scratch.append(tempfile.mkdtemp(prefix="amm-cluster-certs-"))
            try:
                security = Security.temporary(self._scratch[0])
            except BaseException:
                self.stop()
                raise
            self._issue_agents = True
        #: The operator's TLS material (or the ``security`` given); None for plaintext.
        self.security = security
        argv = ["--listen", listen]
        if security is not None:
            argv += ["--tls", str(security.directory), "--tls-identity", "amm"]
        if interval is not None:
            argv += ["--interval", format_interval(interval)]
        if start is not None:
            argv.append("--start" if start else "--no-start")
        if state is not None:
            argv += ["--state", state]
        if dashboard is not None:
            argv += ["--dashboard-listen", dashboard]
        #: The dashboard's ``host:port`` once serving (``dashboard`` asked for one), else None.
        self.dashboard: str | None = None
        #: The service's arguments, ``--listen`` first: a restart binds the same address.
        self._service_argv = [*argv, *service_args]
        try:
            deadline = time.monotonic() + timeout
            service = self._spawn("amm-service", SERVICE_MODULE, self._service_argv)
            self._service.append(service)
            self.address = service.wait_ready(deadline)
            self.dashboard = (service.ready or {}).get("dashboard")
            self._start_agents(n_workers, deadline)
        except BaseException:
            self.stop()
            raise

    def __repr__(self) -> str:
        return f"<LocalCluster amm={getattr(self, 'address', '?')} workers={len(self._agents)}>"

    @property
    def service_pid(self) -> int:
        """The AMM service's process id, to measure its CPU and memory (as benchmarks do)."""
        return self._service[0].popen.pid

    @property
    def worker_pids(self) -> dict[str, int]:
        """Process ids of the running agents by address, to measure their memory."""
        return {
            agent.address: agent.popen.pid
            for agent in self._agents
            if agent.ready is not None and agent.popen.poll() is None
        }

    @property
    def workers(self) -> list[str]:
        """Addresses of the running agents, in start order (not those that exited, such as an
        agent the AMM retired and closed)."""
        return [
            agent.address
            for agent in self._agents
            if agent.ready is not None and agent.popen.poll() is None
        ]

    def _spawn(self, name: str, module: str, args: Sequence[str]) -> LocalProcess:
        argv = [sys.executable, "-m", module, *args]
        prefix = SERVICE_READY if module == SERVICE_MODULE else AGENT_READY
        env = {**self._env, **self._lifeline.child_env()}
        return LocalProcess(name, argv, prefix, env, self._echo, self._lifeline.fds)

    def _start_agents(self, n: int, deadline: float, listen: str = "127.0.0.1:0") -> list[str]:
        """Spawn ``n`` agents and wait until the AMM lists them.

        Each agent joins ``self._agents`` as soon as it is spawned, so that an interrupt or a
        failed spawn further on leaves it to ``stop()`` rather than running on in its session.
        """
        numbers = range(self._count, self._count + n)
        self._count += n
        return self._spawn_agents([(number, listen) for number in numbers], deadline)

    def _spawn_agents(self, slots: Sequence[tuple[int, str]], deadline: float) -> list[str]:
        """Spawn agent ``worker-N`` on ``listen`` for each ``(N, listen)`` of ``slots``, and wait
        until the AMM lists them all (``_start_agents``)."""
        started = []
        for number, listen in slots:
            name = f"worker-{number}"
            args = ["--amm", self.address, "--listen", listen, "--name", name]
            if self.security is not None:
                identity = self._identity(name)
                args += ["--tls", str(self.security.directory), "--tls-identity", identity]
            if self._zones:
                args += ["--zone", self._zones[number % len(self._zones)]]
            agent = self._spawn(name, AGENT_MODULE, [*args, *self._agent_args])
            self._agents.append(agent)
            started.append(agent)
        addresses = [agent.wait_ready(deadline) for agent in started]
        self.wait_for_workers(addresses, deadline - time.monotonic())
        return addresses

    def _identity(self, name: str) -> str:
        if not self._issue_agents:
            return SHARED_AGENT_NAME
        assert self.security is not None
        self.security.issue(Role.AGENT, name)
        return name

    @property
    def certs(self) -> Path | None:
        """The certs folder, for ``AMM_TLS``; None for plaintext."""
        return self.security.directory if self.security is not None else None

    def exited(self) -> dict[str, int]:
        """Exit codes of the processes that ended without being stopped, by process name."""
        return {
            p.name: p.popen.returncode
            for p in [*self._service, *self._agents]
            if p.popen.poll() is not None
        }

    def forget_departed_workers(self) -> list[str]:
        """Take the agents that exited cleanly by themselves (exit code 0: an agent the AMM
        retired and closed, or one stopped by a signal) out of the cluster; their names."""
        departed = [a for a in self._agents if a.popen.poll() == 0]
        for agent in departed:
            self._agents.remove(agent)
        return [agent.name for agent in departed]

    def _check_alive(self) -> None:
        if not self._finalizer.alive:
            raise ClusterError("the cluster is stopped")

    def add_worker(self, listen: str = "127.0.0.1:0") -> str:
        """Start one more agent and return its address once the AMM lists it; ``listen`` the
        address of an agent stopped before, to restart it there (empty, a new incarnation)."""
        self._check_alive()
        return self._start_agents(1, time.monotonic() + self.timeout, listen)[0]

    def restart_workers(self) -> list[str]:
        """Stop every running agent (SIGTERM: each drains what it holds first) and start a new
        process in its place, on the same address and under the same name; their addresses, once
        the AMM lists them. For runs that must not inherit each other's process memory (an agent
        keeps the heap it grew): ``python -m amm.demo`` between its two replays."""
        self._check_alive()
        old = [a for a in self._agents if a.ready is not None and a.popen.poll() is None]
        slots = [(int(a.name.rsplit("-", 1)[1]), a.address) for a in old]
        _stop_all(old, self.stop_timeout)  # ours until gone: stop() ends them after an interrupt
        for agent in old:
            self._agents.remove(agent)
        return self._spawn_agents(slots, time.monotonic() + self.timeout)

    def restart_service(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to the AMM, wait for it to exit, start it again on the same address with
        the same arguments (a ``state`` file carries its state over); its exit code.

        The agents keep running and take their epochs from the AMM at this address only, so
        they must find the new one here, not elsewhere.
        """
        self._check_alive()
        old = self._service[0]
        old.signal(sig)
        code = old.wait(self.stop_timeout)
        argv = list(self._service_argv)
        argv[1] = self.address
        new = self._spawn("amm-service", SERVICE_MODULE, argv)
        self._service[0] = new
        address = new.wait_ready(time.monotonic() + self.timeout)
        if address != self.address:
            raise ClusterError(f"the AMM restarted on {address}, not {self.address}")
        self.dashboard = (new.ready or {}).get("dashboard")
        return code

    def wait_for_workers(self, addresses: Sequence[str], timeout: float) -> None:
        """Block until the AMM lists every address in ``addresses`` as registered, and has
        polled each once (or tried to): ``amm workers`` then shows their status and memory."""
        deadline = time.monotonic() + timeout
        missing = set(addresses)
        with Client(self.address, timeout=max(1.0, timeout), security=self.security) as client:
            while True:
                try:
                    missing = set(addresses) - {
                        w.address
                        for w in client.workers()
                        if w.last_poll is not None or w.missed_polls
                    }
                except AmmError as err:
                    if err.status != grpc.StatusCode.UNAVAILABLE:
                        raise
                if not missing:
                    return
                if time.monotonic() > deadline:
                    raise ClusterError(f"the AMM did not list {sorted(missing)} in time")
                time.sleep(0.05)

    def stop_worker(
        self, address: str, sig: int = signal.SIGTERM, timeout: float | None = None
    ) -> int:
        """Send ``sig`` to the agent at ``address`` and return its exit code.

        SIGTERM has it drain first (up to its ``--drain-grace``), SIGINT stop at once. The agent
        is SIGKILLed if it is still running after ``timeout`` (``stop_timeout``).
        """
        for agent in self._agents:
            if agent.ready is not None and agent.address == address:
                break
        else:
            raise ClusterError(f"no running worker at {address}; workers: {self.workers}")
        self._agents.remove(agent)
        agent.signal(sig)
        return agent.wait(self.stop_timeout if timeout is None else timeout)

    def signal_worker(self, address: str, sig: int) -> None:
        """Send ``sig`` to the agent at ``address`` and return at once; it stays in the cluster
        (``SIGSTOP`` then ``SIGCONT`` freezes a worker, to see the AMM declare it dead)."""
        for agent in self._agents:
            if agent.ready is not None and agent.address == address:
                agent.signal(sig)
                return
        raise ClusterError(f"no running worker at {address}; workers: {self.workers}")

    def stop(self) -> None:
        """Stop the agents, then the AMM (SIGTERM, then SIGKILL after the deadline); idempotent."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
