"""Prometheus metrics of a live cluster: an AMM and two agents in this process, each serving its
own registry on a loopback port, scraped over HTTP and read with Prometheus's text parser while
the cluster puts keys, drops and copies replicas, serves reads and retires a worker."""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from amm.base.security import Security, SecurityError
from amm.base.serving import CHANNEL_OPTIONS
from amm.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc, types_pb2
from amm_service.api.server import AmmServer
from amm_service.decisions.view import Key
from tests.conftest import amm_config
from tests.integration.test_agent_process import unused_address
from tests.support.agent import (
    Stub,
    dial,
    directive_stream,
    drop,
    get,
    put,
    reason,
    replicate,
    running_agent,
    status,
)
from tests.support.faults import amm_with_fake_peers
from tests.support.metrics import Scrape, scrape
from tests.support.waiting import wait_for
from worker_agent.agent import Agent
from worker_agent.config import AgentConfig

LOOPBACK = "127.0.0.1:0"


@dataclass
class Cluster:
    amm: AmmServer
    agents: list[Agent]
    stubs: list[Stub]
    control: control_pb2_grpc.ActiveMemoryManagerAsyncStub

    async def scrape_amm(self) -> Scrape:
        assert self.amm.metrics is not None
        return await asyncio.to_thread(scrape, self.amm.metrics.address)

    async def scrape_agents(self) -> list[Scrape]:
        addresses = [a.metrics.address for a in self.agents if a.metrics is not None]
        return list(await asyncio.gather(*(asyncio.to_thread(scrape, a) for a in addresses)))


@asynccontextmanager
async def cluster(tmp_path: Path, n: int = 2) -> AsyncIterator[Cluster]:
    """An AMM (stopped: the test runs its cycles) and ``n`` agents, all serving metrics."""
    async with AsyncExitStack() as stack:
        amm = await stack.enter_async_context(
            AmmServer(amm_config(tmp_path, metrics_listen=LOOPBACK))
        )
        agents = []
        for i in range(n):
            config = AgentConfig(
                amm=amm.address, listen=LOOPBACK, metrics_listen=LOOPBACK, name=f"w{i}"
            )
            agents.append(await stack.enter_async_context(Agent(config)))
        stubs = [await stack.enter_async_context(dial(a.address)) for a in agents]
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(amm.address, options=CHANNEL_OPTIONS)
        )
        manager = amm.manager
        assert manager is not None
        # Registered as the agents see it: their RegisterWorker calls have ended (and are counted).
        await wait_for(
            lambda: len(manager.state.workers) == n and all(a.registered for a in agents),
            what="agents registered",
        )
        yield Cluster(amm, agents, stubs, control_pb2_grpc.ActiveMemoryManagerStub(channel))


def total(scrapes: list[Scrape], name: str, **labels: str) -> float:
    return sum(s.value(name, **labels) for s in scrapes)


async def test_values_move_as_the_cluster_acts(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        manager = c.amm.manager
        assert manager is not None
        before = await c.scrape_amm()
        assert before.value("amm_keys") == 0
        assert before.value("amm_running") == 0
        assert before.value("amm_workers") == 2
        assert before.types["amm_cycle_phase_duration_seconds"] == "histogram"
        assert before.value("amm_rpc_duration_seconds_count", method="RegisterWorker") >= 2

        # Three keys, each put on both agents: two replicas each.
        sizes = {"k0": 1000, "k1": 2000, "k2": 3000}
        for key, size in sizes.items():
            for stub in c.stubs:
                await put(stub, key, bytes(size))
        agents = await c.scrape_agents()
        assert [s.value("amm_agent_keys") for s in agents] == [3, 3]
        assert [s.value("amm_agent_stored_bytes") for s in agents] == [6000, 6000]
        assert total(agents, "amm_agent_received_bytes_total", via="put") == 12000
        assert total(agents, "amm_agent_rpc_duration_seconds_count", method="Put", code="OK") == 6

        # A cycle: ReduceReplicas drops one copy of each, the agents ask each other to keep it.
        record = await manager.run_cycle(wait=True)
        assert record.applied == 3
        await manager.queries.refresh(True)
        after = await c.scrape_amm()
        assert after.value("amm_keys") == 3
        assert after.value("amm_replicas") == 3
        assert after.value("amm_unique_bytes") == 6000
        assert after.value("amm_workers", status="running") == 2
        assert after.value("amm_directives_sent_total", op="drop") == 3
        assert after.value("amm_directives_sent_total", op="replicate") == 0
        assert after.value("amm_directive_outcomes_total", op="drop", outcome="applied") == 3
        assert after.value("amm_directive_outcomes_total", outcome="refused") == 0
        assert after.value("amm_directives_in_flight") == 0, "the view took the drops in"
        assert after.value("amm_suggestions_total") >= 3
        assert after.value("amm_cycle_duration_seconds_count") == 1
        for phase in ("poll", "plan", "send"):
            assert after.value("amm_cycle_phase_duration_seconds_count", phase=phase) == 1
            assert (
                after.value("amm_cycle_phase_duration_seconds_bucket", phase=phase, le="+Inf") == 1
            )
        assert after.value("amm_memory_bytes", measure="managed") == 6000, "as last polled"
        agents = await c.scrape_agents()
        assert sum(s.value("amm_agent_keys") for s in agents) == 3
        drops = total(agents, "amm_agent_directives_total", op="drop", outcome="applied")
        assert drops == 3
        assert total(agents, "amm_agent_rpc_duration_seconds_count", method="PromiseKeepBatch") >= 1
        assert all(
            s.value("amm_agent_rpc_duration_seconds_count", method="Poll") >= 1 for s in agents
        )

        # A goal of two copies of k0: one agent fetches it from the other.
        (holder,) = manager.state.keys[Key("k0")].holders
        source = c.agents[[a.address for a in c.agents].index(holder)]
        target = next(a for a in c.agents if a is not source)
        sent_before = await asyncio.to_thread(scrape, _metrics(source))
        await manager.queries.replicate(["k0"], 2)
        record = await manager.run_cycle(wait=True)
        assert record.applied == 1
        amm = await c.scrape_amm()
        assert amm.value("amm_directives_sent_total", op="replicate") == 1
        assert amm.value("amm_directive_outcomes_total", op="replicate", outcome="applied") == 1
        assert amm.value("amm_keys_with_goal") == 1
        received = await asyncio.to_thread(scrape, _metrics(target))
        assert received.value("amm_agent_received_bytes_total", via="peer") == 1000
        assert received.value("amm_agent_transfer_duration_seconds_count", direction="in") == 1
        assert received.value("amm_agent_directives_total", op="replicate", outcome="applied") == 1
        sent = await asyncio.to_thread(scrape, _metrics(source))
        fetched = sent.value("amm_agent_sent_bytes_total", via="fetch")
        assert fetched - sent_before.value("amm_agent_sent_bytes_total", via="fetch") == 1000
        assert sent.value("amm_agent_rpc_duration_seconds_count", method="Fetch", code="OK") == 1

        # A client reads k1 through the agent that lacks it: a read-through, then a Get out.
        (holder,) = manager.state.keys[Key("k1")].holders
        reader = next(i for i, a in enumerate(c.agents) if a.address != holder)
        await get(c.stubs[reader], "k1")
        mine = await asyncio.to_thread(scrape, _metrics(c.agents[reader]))
        assert mine.value("amm_agent_sent_bytes_total", via="get") == 2000
        assert mine.value("amm_agent_transfer_duration_seconds_count", direction="out") == 1


async def test_status_codes_are_labelled(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        await c.control.GetStatus(control_pb2.GetStatusRequest())
        with pytest.raises(grpc.aio.AioRpcError):
            await c.control.WhoHas(control_pb2.WhoHasRequest(keys=["missing"]))
        with pytest.raises(grpc.aio.AioRpcError):
            await get(c.stubs[0], "missing")
        amm = await c.scrape_amm()
        rpc = "amm_rpc_duration_seconds_count"
        assert amm.value(rpc, method="GetStatus", code="OK") == 1
        assert amm.value(rpc, method="WhoHas", code="NOT_FOUND") == 1
        assert amm.value(rpc, service="amm.v1.ActiveMemoryManager", method="WhoHas") == 1
        # The agent's: a Get of a key it lacks asks the AMM what the cluster holds under it.
        assert amm.value(rpc, method="LookupKeys", code="OK") == 1
        agent = (await c.scrape_agents())[0]
        assert (
            agent.value("amm_agent_rpc_duration_seconds_count", method="Get", code="NOT_FOUND") == 1
        )


async def test_an_agent_counts_its_refusals_by_reason() -> None:
    async with running_agent(metrics_listen=LOOPBACK) as agent, dial(agent.address) as stub:
        await put(stub, "p", b"pinned")
        await stub.Pin(agent_pb2.PinRequest(key="p"))
        async with directive_stream(stub) as stream:
            refused = await stream.run(drop("p", holders=["127.0.0.1:1"]))
            failed = await stream.run(replicate("q", b"q", sources=[unused_address()]))
        assert (status(refused), reason(refused)) == ("REFUSED", "PINNED")
        assert (status(failed), reason(failed)) == ("FAILED", "SOURCE_UNAVAILABLE")
        address = _metrics(agent)
        got = await wait_for(
            lambda: asyncio.to_thread(scrape, address),
            lambda s: s.has("amm_agent_rpc_duration_seconds_count", method="Directives"),
            what="the directive stream observed once it ended",
        )
        rpc = "amm_agent_rpc_duration_seconds_count"
        assert got.value(rpc, method="Directives", code="CANCELLED") == 1, "the test hung up"
        directives = "amm_agent_directives_total"
        assert got.value(directives, op="drop", outcome="refused", reason="pinned") == 1
        assert (
            got.value(directives, op="replicate", outcome="failed", reason="source_unavailable")
            == 1
        )
        assert got.value(directives, outcome="applied") == 0


async def test_an_agent_counts_refused_puts_and_keep_promises_by_reason() -> None:
    """Before: only directives were counted; a refused Put, PutMany or PromiseKeep left no
    trace in the metrics."""
    async with (
        running_agent(metrics_listen=LOOPBACK, memory_limit=1_000_000) as agent,
        dial(agent.address) as stub,
    ):
        await put(stub, "k", b"kept")
        with pytest.raises(grpc.aio.AioRpcError) as conflict:
            await put(stub, "k", b"KEPT")  # other content under the key
        assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.aio.AioRpcError) as too_big:
            await put(stub, "big", b"x" * 2_000_000)
        assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as too_big_many:
            await stub.PutMany(
                iter(
                    [
                        agent_pb2.PutManyRequest(
                            items=[agent_pb2.PutItem(key="many", data=b"y" * 2_000_000)]
                        )
                    ]
                )
            )
        assert too_big_many.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        kept = await stub.PromiseKeep(agent_pb2.PromiseKeepRequest(key="absent"))
        assert not kept.kept
        batch = await stub.PromiseKeepBatch(
            agent_pb2.PromiseKeepBatchRequest(
                items=[
                    agent_pb2.KeepItem(key="k"),
                    agent_pb2.KeepItem(key="gone"),
                    agent_pb2.KeepItem(key="gone-too"),
                ]
            )
        )
        assert [a.kept for a in batch.answers] == [True, False, False]
        got = await asyncio.to_thread(scrape, _metrics(agent))
        refusals = "amm_agent_refusals_total"
        assert got.value(refusals, request="put", reason="content_conflict") == 1
        assert got.value(refusals, request="put", reason="memory_limit") == 2
        assert got.value(refusals, request="promise_keep", reason="not_held") == 3
        assert got.value(refusals) == 6


class _Refuser(agent_pb2_grpc.WorkerAgentServicer):
    """Holds key "x"; refuses every directive as PINNED, at once."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        return agent_pb2.PollResponse(
            incarnation=self.name,
            version=1,
            full=True,
            keys=[types_pb2.KeyInfo(key="x", size=10, checksum="a" * 64)],
            status=types_pb2.WORKER_STATUS_RUNNING,
            features=["directive-batches"],
        )

    async def Directives(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async for request in request_iterator:
            yield agent_pb2.DirectivesResponse(
                batch=[
                    types_pb2.DirectiveOutcome(
                        directive_id=d.id,
                        status=types_pb2.OUTCOME_STATUS_REFUSED,
                        reason=types_pb2.REFUSAL_REASON_PINNED,
                    )
                    for d in list(request.batch) or [request.directive]
                ]
            )


async def test_the_amm_counts_refusals_by_op_and_reason(tmp_path: Path) -> None:
    one, two = _Refuser("one"), _Refuser("two")  # type: ignore[abstract]
    config = amm_config(tmp_path, metrics_listen=LOOPBACK)
    async with amm_with_fake_peers(config, {"one": one, "two": two}) as (amm, manager, _):
        assert amm.metrics is not None
        record = await manager.run_cycle(wait=True)
        assert record.refused == 1
        got = await asyncio.to_thread(scrape, amm.metrics.address)
        outcomes = "amm_directive_outcomes_total"
        assert got.value(outcomes, op="drop", outcome="refused", reason="pinned") == 1
        assert got.value(outcomes, outcome="applied") == 0
        assert got.value("amm_directives_sent_total", op="drop") == 1
        assert got.value("amm_keys") == 1
        assert got.value("amm_replicas") == 2
        assert got.value("amm_unique_bytes") == 10


async def test_a_retirement_is_counted_by_outcome(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        manager = c.amm.manager
        assert manager is not None
        await put(c.stubs[0], "r", bytes(100))
        await manager.queries.refresh(True)
        (result,) = await manager.retirement_driver.retire_workers(
            [c.agents[0].address], n=None, close=False, timeout=20
        )
        assert result.retired, result.reason
        amm = await c.scrape_amm()
        assert amm.value("amm_retirements_started_total") == 1
        assert amm.value("amm_retirements_total", outcome="retired") == 1
        assert amm.value("amm_retirements_total", outcome="abandoned") == 0
        assert amm.value("amm_events_total", kind="retired") == 1
        assert amm.value("amm_workers", status="retired") == 1
        assert amm.value("amm_directive_outcomes_total", op="replicate", outcome="applied") == 1


def _metrics(agent: Agent) -> str:
    assert agent.metrics is not None
    return agent.metrics.address


async def test_a_metrics_port_in_use_fails_the_start_and_frees_the_grpc_port(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        listen = unused_address()
        config = amm_config(tmp_path, listen=listen, metrics_listen=busy)
        with pytest.raises(OSError, match=f"cannot serve metrics on {busy}"):
            async with AmmServer(config):
                pass
        with socket.socket() as again:
            again.bind(("127.0.0.1", int(listen.rsplit(":", 1)[1])))  # released
        listen = unused_address()
        with pytest.raises(OSError, match=f"cannot serve metrics on {busy}"):
            async with running_agent(listen=listen, metrics_listen=busy):
                pass
        with socket.socket() as again:
            again.bind(("127.0.0.1", int(listen.rsplit(":", 1)[1])))


def _https_get(url: str, context: ssl.SSLContext) -> str:
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return str(response.read().decode())


async def test_metrics_follow_the_servers_tls_rule(tmp_path: Path) -> None:
    """With --tls the metrics are HTTPS for holders of a cluster certificate only; without it,
    an address off loopback refuses to start, as the gRPC port does."""
    certs = Security.temporary(tmp_path / "certs")
    config = amm_config(tmp_path, metrics_listen=LOOPBACK, tls=str(certs.directory))
    async with AmmServer(config) as amm:
        assert amm.metrics is not None
        url = f"https://{amm.metrics.address}/metrics"
        scraper = ssl.create_default_context(cafile=str(certs.ca))
        scraper.check_hostname = False  # the AMM's certificate names its role, not 127.0.0.1
        reader = certs.as_identity("reader")
        assert reader.cert is not None
        assert reader.key is not None
        scraper.load_cert_chain(str(reader.cert), str(reader.key))
        assert "amm_running" in await asyncio.to_thread(_https_get, url, scraper)
        anonymous = ssl.create_default_context(cafile=str(certs.ca))
        anonymous.check_hostname = False
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            await asyncio.to_thread(_https_get, url, anonymous)
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            await asyncio.to_thread(scrape, amm.metrics.address)
    with pytest.raises(SecurityError, match="without TLS"):
        async with AmmServer(amm_config(tmp_path, metrics_listen="0.0.0.0:0")):
            pass
