"""Settings of one worker agent: a frozen, documented dataclass validated once at construction.

It holds values only; reading flags and ``AMM_AGENT_*`` variables is the job of ``__main__``, so
that tests and embedders build an ``AgentConfig`` directly and every setting is passed explicitly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from amm.base.security import Role, Security
from amm.base.serving import MAX_MESSAGE_BYTES
from amm.base.validation import address_problem, name_problem, zone_problem

MiB = 1024**2
GiB = 1024**3
DEFAULT_MAX_LEASE = 60.0
DEFAULT_PAUSE_FRACTION = 0.8
#: ``advertise`` value that advertises this machine's IP on the route to the AMM (see
#: ``worker_agent.advertise``).
ADVERTISE_AUTO = "auto"


def _check(problem: str | None) -> None:
    if problem is not None:
        raise ValueError(problem)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """How one agent listens, where it registers and which limits protect its worker."""

    #: Address of the AMM (``host:port``) to register with; None runs standalone (tests, demos).
    amm: str | None = None
    #: Address the agent's gRPC server binds; port 0 picks a free port.
    listen: str = "127.0.0.1:0"
    #: Address peers and the AMM dial; defaults to the bound listen address. ``"auto"``: this
    #: machine's IP on the route to the AMM with the bound port (replicated containers).
    advertise: str | None = None
    #: Human-readable name reported to the AMM; defaults to the name of a named agent certificate
    #: (``security``), else to the advertised address.
    name: str | None = None
    #: The failure domain (rack, zone, host group) reported to the AMM, which spreads the copies
    #: of a key over zones first; empty: none.
    zone: str = ""
    #: Memory limit of the worker in bytes; 0 means none. Replicas that would push the managed
    #: memory over it are refused, and Puts fail with RESOURCE_EXHAUSTED.
    memory_limit: int = 0
    #: The agent reports PAUSED (and takes no new replicas) while the process memory exceeds
    #: ``pause_fraction * memory_limit``, and RUNNING again once it is back below; None never
    #: pauses. Without a memory limit it never pauses either.
    pause_fraction: float | None = DEFAULT_PAUSE_FRACTION
    #: Size of the chunks values travel in (Get, Fetch). A quarter of the 16 MiB message cap:
    #: a 64 MiB replication cost the receiving agent about 10% less CPU than with 1 MiB chunks
    #: (fewer messages), and larger chunks gained nothing more.
    chunk_size: int = 4 * MiB
    #: Offer values to peers over a bulk port (``worker_agent.bulk``: raw bytes over TCP, about
    #: half the CPU of gRPC chunks) and ask peers for it. Plaintext only: with ``security`` set,
    #: values always travel over gRPC.
    bulk: bool = True
    #: Largest value accepted; a larger Put fails with RESOURCE_EXHAUSTED.
    max_value_bytes: int = 1 * GiB
    #: Bytes of values served (Get, Fetch) at once, which gRPC may buffer for readers; more
    #: reads wait (up to ``stream_idle_timeout``, then RESOURCE_EXHAUSTED). None: a quarter of
    #: ``memory_limit``, and no bound without one. Counted against the memory limit while served.
    max_serving_bytes: int | None = None
    #: Lease of the keep-promises this agent asks peers for before dropping a key, in seconds.
    lease: float = 5.0
    #: Longest lease this agent grants a peer, whatever the peer asks for, in seconds.
    max_lease: float = DEFAULT_MAX_LEASE
    #: Unmanaged memory counts as "old" when it persisted over this window, in seconds (Dask's
    #: optimistic memory: recent spikes do not make a worker look full).
    unmanaged_window: float = 30.0
    #: How often the memory is sampled for that window, in seconds.
    memory_interval: float = 0.5
    #: Directives carried out at the same time; also how many directives one Directives stream
    #: has in hand (read, outcome not yet sent) before it reads the next.
    max_concurrent_directives: int = 8
    #: Values of 1 MiB or more sent over the bulk port at once (each by a thread of its own), to
    #: all receivers and clients together; more wait their turn, each up to
    #: ``stream_idle_timeout``. A receiver takes ``max_concurrent_directives`` at most, but a
    #: source may serve many.
    max_bulk_senders: int = 4
    #: Channels to peers kept open at most; beyond it the least recently used idle ones close.
    max_peer_channels: int = 256
    #: Deadline of one peer transfer (one source), in seconds.
    fetch_timeout: float = 30.0
    #: A source must send a value's header within this long, in seconds, or the next source is
    #: tried: a silent source (a frozen worker, a black-holed address) must not hold a
    #: directive, and the directive slot it takes, for the whole ``fetch_timeout``.
    source_timeout: float = 5.0
    #: A Get or Fetch whose reader accepts no chunk for this long is ended with
    #: DEADLINE_EXCEEDED, in seconds: a reader that stopped reading must not keep the key in use
    #: (undroppable) for as long as its connection lives.
    stream_idle_timeout: float = 30.0
    #: Deadline of one PromiseKeep call to a holder during a DROP, in seconds.
    promise_timeout: float = 2.0
    #: Longest pause between two registration attempts, in seconds (backoff starts at 0.1 s).
    register_backoff_max: float = 2.0
    #: While registration keeps failing, a warning is logged this often, in seconds (after the
    #: first and the tenth failed attempts).
    register_warning_interval: float = 30.0
    #: How long ``stop`` lets in-flight calls finish before cancelling them, in seconds.
    stop_grace: float = 0.5
    #: On SIGTERM, how long the agent waits for the AMM to copy what only it holds elsewhere
    #: before it stops anyway, in seconds (0: stop at once). Below Kubernetes' default of 30 s
    #: between SIGTERM and SIGKILL, with room left for the stop itself.
    drain_grace: float = 20.0
    #: How long a tombstone of a forgotten key is kept, in seconds. It must outlive any copy of
    #: the key under way when it arrived (a fetch gives up after ``fetch_timeout``, 30 s), and
    #: the AMM's own tombstone (``--tombstone-ttl``, 2 minutes by default), which an AMM that
    #: restarted sends again: known by its id, it deletes nothing put since. Each costs about
    #: 300 bytes for as long as it is kept.
    tombstone_ttl: float = 180.0
    #: Address (``host:port``) to serve Prometheus metrics on over HTTP; None serves none.
    metrics_listen: str | None = None
    #: TLS material (``Security.from_dir(DIR, identity)``, an agent identity): the server is
    #: mutual TLS with every call authorized by role, and the agent dials the AMM and its peers
    #: with this identity. None: plaintext, as on loopback.
    security: Security | None = None
    #: Serve plaintext on an address other than loopback, where anyone who can reach it may
    #: read and write values; without it such a ``listen`` refuses to start.
    insecure: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def serving_budget(self) -> int:
        """``max_serving_bytes`` in effect; 0 for no bound."""
        if self.max_serving_bytes is not None:
            return self.max_serving_bytes
        return max(self.memory_limit // 4, 1) if self.memory_limit else 0

    def validate(self) -> None:
        """Raise ValueError naming the setting and what would be accepted."""
        # The rules the AMM applies to a registration (amm.base.validation), so that an agent
        # starts only with what its AMM will accept.
        _check(address_problem("listen", self.listen, port_zero=True))
        if self.amm is not None:
            _check(address_problem("amm", self.amm))
        if self.metrics_listen is not None:
            _check(address_problem("metrics_listen", self.metrics_listen, port_zero=True))
        if self.advertise is not None and self.advertise != ADVERTISE_AUTO:
            _check(address_problem("advertise", self.advertise))
        if self.name is not None:
            _check(name_problem(self.name))
        _check(zone_problem(self.zone))
        if self.memory_limit < 0:
            raise ValueError(
                f"memory_limit must be >= 0 bytes (0 = no limit), got {self.memory_limit}"
            )
        if self.pause_fraction is not None and (
            not (0 < self.pause_fraction <= 1) or math.isnan(self.pause_fraction)
        ):
            raise ValueError(
                f"pause_fraction must be in (0, 1], got {self.pause_fraction}; "
                "set it to None to never pause"
            )
        if not 1 <= self.chunk_size <= MAX_MESSAGE_BYTES // 2:
            raise ValueError(
                f"chunk_size must be between 1 byte and {MAX_MESSAGE_BYTES // 2} bytes, "
                f"got {self.chunk_size}"
            )
        if self.max_serving_bytes is not None and self.max_serving_bytes < 1:
            raise ValueError(f"max_serving_bytes must be >= 1, got {self.max_serving_bytes}")
        if self.max_value_bytes < 1:
            raise ValueError(f"max_value_bytes must be >= 1, got {self.max_value_bytes}")
        for field in (
            "lease",
            "max_lease",
            "unmanaged_window",
            "memory_interval",
            "fetch_timeout",
            "source_timeout",
            "stream_idle_timeout",
            "promise_timeout",
            "register_backoff_max",
            "register_warning_interval",
            "tombstone_ttl",
        ):
            value = getattr(self, field)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{field} must be a positive number of seconds, got {value}")
        if self.stop_grace < 0:
            raise ValueError(f"stop_grace must be >= 0 seconds, got {self.stop_grace}")
        if not (self.drain_grace >= 0 and math.isfinite(self.drain_grace)):
            raise ValueError(
                f"drain_grace must be >= 0 seconds (0: no drain), got {self.drain_grace}"
            )
        if self.lease > self.max_lease:
            raise ValueError(
                f"lease ({self.lease} s) must not exceed max_lease ({self.max_lease} s), "
                "the longest promise this agent would grant itself"
            )
        if self.max_peer_channels < 1:
            raise ValueError(f"max_peer_channels must be >= 1, got {self.max_peer_channels}")
        if self.security is not None:
            identity = self.security.identity()
            if identity is None or identity.role is not Role.AGENT:
                raise ValueError(
                    f"{self.security.cert} is {identity or 'no identity'}: an agent serves with "
                    "an agent identity (--tls-identity)"
                )
        if self.max_concurrent_directives < 1:
            raise ValueError(
                f"max_concurrent_directives must be >= 1, got {self.max_concurrent_directives}"
            )
        if self.max_bulk_senders < 1:
            raise ValueError(f"max_bulk_senders must be >= 1, got {self.max_bulk_senders}")
