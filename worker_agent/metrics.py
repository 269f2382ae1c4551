"""The agent's Prometheus metrics, served over HTTP on ``--metrics-listen``.

Everything is read at scrape time, on the event loop, from what the agent keeps anyway: the
store (keys, bytes), a fresh memory sample (as a poll takes one), the traffic counters
(``Node.traffic``), the directive runner's counts and the RPC durations of the server
interceptor. The list of metrics is in the README ("Metrics").
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from amm.base.metrics import MetricsEndpoint, RpcDurations, histogram
from amm.base.security import Security
from worker_agent.directives import OutcomeStatus
from worker_agent.integrity import Op, Reason
from worker_agent.node import Node, WorkerStatus
from worker_agent.traffic import RECEIVED_VIA, SENT_VIA

PREFIX = "amm_agent"


def reason_label(reason: Reason | None) -> str:
    """A refusal reason as a label value: ``pinned``, ``no_confirmed_holder``...; ``none``."""
    return "none" if reason is None else reason.name.lower()


def families(node: Node, rpc: RpcDurations | None) -> Iterator[Metric]:
    """Every metric of the agent, read now; runs on the event loop."""
    report = node.sample_memory()
    memory = GaugeMetricFamily(
        f"{PREFIX}_memory_bytes",
        "Memory of the worker by measure: process (RSS), managed (the values held), "
        "unmanaged_old (unmanaged memory that persisted over the window), optimistic "
        "(managed + unmanaged_old)",
        labels=["measure"],
    )
    for measure in ("process", "managed", "unmanaged_old", "optimistic"):
        memory.add_metric([measure], getattr(report, measure))
    yield memory
    if report.limit:
        yield GaugeMetricFamily(
            f"{PREFIX}_memory_limit_bytes", "The worker's memory limit", value=report.limit
        )
    status = node.status(report)
    statuses = GaugeMetricFamily(
        f"{PREFIX}_status",
        "1 for the status the agent reports, 0 for the others",
        labels=["status"],
    )
    for each in WorkerStatus:
        statuses.add_metric([each.name.lower()], 1 if each is status else 0)
    yield statuses
    yield GaugeMetricFamily(f"{PREFIX}_keys", "Keys held", value=len(node.store))
    yield GaugeMetricFamily(
        f"{PREFIX}_stored_bytes", "Bytes of the values held", value=node.store.total_bytes
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_peer_channels", "Channels to peers open", value=len(node.peers)
    )
    traffic = node.traffic
    received = CounterMetricFamily(
        f"{PREFIX}_received_bytes",
        "Bytes of values received and accepted, by way: put, put_many (clients), peer "
        "(fetched from another agent, verified)",
        labels=["via"],
    )
    for via in RECEIVED_VIA:
        received.add_metric([via], traffic.received[via])
    yield received
    sent = CounterMetricFamily(
        f"{PREFIX}_sent_bytes",
        "Bytes of values written out in full, by way: get (clients), fetch (peers)",
        labels=["via"],
    )
    for via in SENT_VIA:
        sent.add_metric([via], traffic.sent[via])
    yield sent
    yield histogram(
        f"{PREFIX}_transfer_duration_seconds",
        "Value transfers: in, a fetch from peers until a verified value; out, a Get or Fetch "
        "stream written in full",
        ("direction",),
        traffic.transfers,
    )
    directives = CounterMetricFamily(
        f"{PREFIX}_directives",
        "Directives carried out, by op, outcome (applied, refused, failed) and reason (none "
        "when applied)",
        labels=["op", "outcome", "reason"],
    )
    for (op, outcome, reason), n in sorted(
        node.runner.counts.items(), key=lambda item: _order(*item[0])
    ):
        directives.add_metric([op.name.lower(), outcome.name.lower(), reason_label(reason)], n)
    yield directives
    refusals = CounterMetricFamily(
        f"{PREFIX}_refusals",
        "Requests refused, by request (put: a Put or PutMany call; promise_keep: each key of "
        "PromiseKeep or PromiseKeepBatch) and reason; directives are counted under "
        f"{PREFIX}_directives",
        labels=["request", "reason"],
    )
    for (request, why), n in sorted(node.refusals.items()):
        refusals.add_metric([request, why], n)
    yield refusals
    if rpc is not None:
        yield rpc.family(
            f"{PREFIX}_rpc_duration_seconds",
            "Calls the agent served, by service, method and status code; a stream is observed "
            "when it ends",
        )


def _order(op: Op, outcome: OutcomeStatus, reason: Reason | None) -> tuple[int, int, int]:
    return op.value, outcome.value, 0 if reason is None else reason.value


def endpoint(
    node: Node, listen: str, security: Security | None = None, *, insecure: bool = False
) -> MetricsEndpoint:
    """The agent's metrics endpoint on ``listen``, once started, under its TLS rule."""
    return MetricsEndpoint.secured(
        listen, lambda rpc: families(node, rpc), security, insecure=insecure
    )
