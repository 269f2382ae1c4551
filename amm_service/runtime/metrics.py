"""The AMM's Prometheus metrics, served over HTTP on ``metrics-listen``.

Read at scrape time, on the event loop, from what the AMM keeps anyway: the live cluster state
(workers, keys, replicas, bytes), the ledger, the goals, the lost keys, the event counts, the
directive totals (``Outcomes.totals``), the cycle statistics (one observation per phase per
cycle) and the RPC durations of the server interceptor. Nothing is counted for the metrics alone
on a hot path. The list of metrics is in the README ("Metrics").
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from amm.base.metrics import MetricsEndpoint, RpcDurations, histogram
from amm.base.security import Security
from amm_service.decisions.directive import Op
from amm_service.decisions.view import MEASURES, WorkerStatus
from amm_service.runtime.manager import ActiveMemoryManager

PREFIX = "amm"
#: Event kinds that end a retirement, and the outcome each stands for.
RETIREMENT_OUTCOMES = {"retired": "retired", "retire-abandoned": "abandoned"}


def reason_label(reason: str) -> str:
    """A wire refusal reason (``PINNED``) as a label value (``pinned``); ``none`` when empty."""
    return reason.lower() if reason else "none"


def families(amm: ActiveMemoryManager, rpc: RpcDurations | None) -> Iterator[Metric]:
    """Every metric of the AMM, read now; runs on the event loop."""
    yield from _control(amm)
    yield from _cluster(amm)
    yield from _cycles(amm)
    yield from _directives(amm)
    yield from _events(amm)
    if rpc is not None:
        yield rpc.family(
            f"{PREFIX}_rpc_duration_seconds",
            "Calls the AMM served (control API, health), by service, method and status code",
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def _control(amm: ActiveMemoryManager) -> Iterator[Metric]:
    yield _gauge("running", "1 while the AMM cycles, 0 while it is stopped", int(amm.running))
    yield _gauge("epoch", "The epoch the AMM runs as", amm.epoch)
    yield _gauge(
        "startup_grace", "1 while drops are held back after a restart", int(amm.in_startup_grace())
    )


def _cluster(amm: ActiveMemoryManager) -> Iterator[Metric]:
    state = amm.state
    workers = state.workers
    by_status = GaugeMetricFamily(
        f"{PREFIX}_workers",
        "Registered workers by status: the AMM's verdict (stale, retiring, retired) over what "
        "the agent reports (running, paused, closing; unknown before its first poll)",
        labels=["status"],
    )
    counts = dict.fromkeys(WorkerStatus, 0)
    for worker in workers:
        counts[worker.effective_status] += 1
    for status, n in counts.items():
        by_status.add_metric([status.value], n)
    yield by_status
    yield _gauge(
        "workers_unreachable",
        "Workers that missed their last poll",
        sum(1 for w in workers if not w.reachable),
    )
    memory = GaugeMetricFamily(
        f"{PREFIX}_memory_bytes",
        "Memory of all workers by measure, as they last reported it",
        labels=["measure"],
    )
    for measure in MEASURES:
        memory.add_metric([measure], sum(w.memory.by(measure) for w in workers))
    yield memory
    keys = state.keys
    yield _gauge("keys", "Keys held by any worker", len(keys))
    yield _gauge("replicas", "Copies of keys held, over all workers", state.nreplicas)
    yield _gauge(
        "unique_bytes",
        "Bytes of the keys held, each counted once",
        sum(kv.size for kv in keys.values()),
    )
    yield _gauge(
        "conflicting_keys",
        "Keys held with different content by different workers",
        len(state.conflicts),
    )
    yield _gauge("lost_keys", "Keys lost with a dead worker and not seen since", amm.lost_keys)
    with_goal, below_goal = amm.goals.totals(state)
    yield _gauge("keys_with_goal", "Keys with a replication goal", with_goal)
    yield _gauge("keys_below_goal", "Keys with fewer live copies than their goal", below_goal)


def _cycles(amm: ActiveMemoryManager) -> Iterator[Metric]:
    stats = amm.cycle_stats
    yield histogram(
        f"{PREFIX}_cycle_duration_seconds",
        "Cycles run (not dry runs), start to end",
        (),
        {(): stats.duration},
    )
    yield histogram(
        f"{PREFIX}_cycle_phase_duration_seconds",
        "Phases of each cycle: poll (every agent), plan (the policies and the core), send "
        "(the directives onto the streams)",
        ("phase",),
        stats.phases,
    )
    yield CounterMetricFamily(
        f"{PREFIX}_suggestions", "Suggestions the policies made", value=stats.suggestions
    )
    yield CounterMetricFamily(
        f"{PREFIX}_suggestions_rejected",
        "Suggestions the core rejected (throttled, no candidate, last copy...)",
        value=stats.rejected,
    )


def _directives(amm: ActiveMemoryManager) -> Iterator[Metric]:
    totals = amm.outcomes.totals
    sent = CounterMetricFamily(
        f"{PREFIX}_directives_sent",
        "Directives sent to agents, by op (an overdue one sent again under its id counts again)",
        labels=["op"],
    )
    for op in Op:
        sent.add_metric([op.value], totals.sent_by_op[op])
    yield sent
    outcomes = CounterMetricFamily(
        f"{PREFIX}_directive_outcomes",
        "Directives ended, by op, outcome (applied, refused, failed) and the agent's reason "
        "(none when applied; unanswered when given up on)",
        labels=["op", "outcome", "reason"],
    )
    for (op, status, reason), n in sorted(
        totals.by_outcome.items(), key=lambda item: (item[0][0].value, item[0][1].value, item[0][2])
    ):
        outcomes.add_metric([op.value, status.value, reason_label(reason)], n)
    yield outcomes
    yield _gauge(
        "directives_in_flight", "Directives sent whose effect has not shown yet", len(amm.ledger)
    )


def _events(amm: ActiveMemoryManager) -> Iterator[Metric]:
    counts = amm.events.counts
    retirements = CounterMetricFamily(
        f"{PREFIX}_retirements", "Retirements ended, by outcome", labels=["outcome"]
    )
    for kind, outcome in RETIREMENT_OUTCOMES.items():
        retirements.add_metric([outcome], counts[kind])
    yield retirements
    yield CounterMetricFamily(
        f"{PREFIX}_retirements_started", "Retirements begun", value=counts["retire-started"]
    )
    events = CounterMetricFamily(
        f"{PREFIX}_events",
        "Events recorded (worker-dead, key-lost, retired...; see GetStatus recent_events)",
        labels=["kind"],
    )
    for kind, n in sorted(counts.items()):
        events.add_metric([kind], n)
    yield events


def endpoint(
    amm: ActiveMemoryManager,
    listen: str,
    security: Security | None = None,
    *,
    insecure: bool = False,
) -> MetricsEndpoint:
    """The AMM's metrics endpoint on ``listen``, once started, under its TLS rule."""
    return MetricsEndpoint.secured(
        listen, lambda rpc: families(amm, rpc), security, insecure=insecure
    )
