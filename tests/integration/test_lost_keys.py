"""Every key whose last holder goes away is reported lost, however it went, and the record
outlives the AMM: a real AMM with its SQLite state file, real agents in this process and, where a
worker must restart or answer as no agent would, a real grpc.aio server playing one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from amm import AmmError, AsyncClient
from amm.base.checksum import checksum
from amm.v1 import agent_pb2, agent_pb2_grpc, control_pb2, types_pb2
from amm_service.api.server import AmmServer
from amm_service.config import AmmConfig
from tests.conftest import amm_config, free_port
from tests.support.agent import dial, put, running_agent
from tests.support.faults import fake_peer
from tests.support.waiting import wait_for
from worker_agent.agent import Agent

DATA = b"lost and found" * 10


class _Worker(agent_pb2_grpc.WorkerAgentServicer):
    """Answers polls as an agent process holding ``keys`` would; ``incarnation`` changes when
    the test restarts it."""

    def __init__(self, incarnation: str, keys: dict[str, bytes]) -> None:
        self.incarnation = incarnation
        self.keys = keys

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        return agent_pb2.PollResponse(
            incarnation=self.incarnation,
            version=1,
            full=True,
            keys=[
                types_pb2.KeyInfo(key=k, size=len(v), checksum=checksum(v))
                for k, v in self.keys.items()
            ],
            status=types_pb2.WORKER_STATUS_RUNNING,
        )


@asynccontextmanager
async def amm_and_client(
    tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[AmmServer, AsyncClient]]:
    async with (
        AmmServer(amm_config(tmp_path, **overrides)) as amm,
        AsyncClient(amm.address, timeout=10) as client,
    ):
        yield amm, client


async def kinds(client: AsyncClient) -> list[str]:
    return [e.kind for e in (await client.status()).recent_events]


async def test_a_worker_that_unregisters_with_the_only_copy_is_on_the_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: unregistering dropped the worker's holdings without the check a death runs (no
    key-lost, lost_keys 0). The key was put after the AMM's last poll: the AMM polls the
    leaving agent once more, so it is counted all the same."""
    caplog.set_level(logging.WARNING, logger="worker_agent.agent")
    async with amm_and_client(tmp_path) as (amm, client):
        async with (
            running_agent(amm=amm.address) as keeper,
            running_agent(amm=amm.address) as leaver,
        ):
            await wait_for(lambda: keeper.registered and leaver.registered, what="registered")
            async with dial(keeper.address) as a, dial(leaver.address) as b:
                await put(a, "shared", DATA)
                await put(b, "shared", DATA)
                await client.who_has()  # the AMM has seen both
                await put(b, "solo", DATA)  # after the AMM's last poll
            address = leaver.address
            await leaver.stop()
            status = await client.status()
            assert status.totals.lost_keys == 1
            (event,) = [e for e in status.recent_events if e.kind == "key-lost"]
            assert (event.worker, event.keys) == (address, ("solo",))
            assert "unregistered" in event.message
            (lost,) = await client.lost_keys()
            assert (lost.key, lost.worker, lost.has_goal) == ("solo", address, False)
            assert f"{address} unregistered before a copy was made elsewhere" == lost.reason
            assert lost.lost_at is not None
            with pytest.raises(AmmError) as err:
                await client.who_has("solo")
            assert err.value.status == grpc.StatusCode.NOT_FOUND
            assert "lost: 'solo'" in err.value.message
            assert await client.who_has("shared") == {"shared": (keeper.address,)}
        # Each agent says what was lost with it: solo with the leaver, then shared with the last.
        logged = [r.getMessage() for r in caplog.records if "recorded" in r.getMessage()]
        assert logged == [
            f"unregistered: {amm.address} recorded 1 key(s) held only here as lost: {k!r}"
            for k in ("solo", "shared")
        ]


async def test_a_forced_close_and_a_direct_unregister_report_what_is_lost(
    tmp_path: Path,
) -> None:
    async with amm_and_client(tmp_path) as (amm, client):
        async with running_agent(amm=amm.address) as agent, dial(agent.address) as stub:
            await wait_for(lambda: agent.registered, what="registered")
            await put(stub, "forced", DATA)
            await stub.Close(agent_pb2.CloseRequest(reason="test", force=True))
            await asyncio.wait_for(agent.stopped.wait(), 5)
        assert [k.key for k in await client.lost_keys()] == ["forced"]
        host = _Worker("i1", {"a": DATA, "b": DATA})  # type: ignore[abstract]
        async with fake_peer(host) as address:
            await client._amm_stub().RegisterWorker(
                control_pb2.RegisterWorkerRequest(address=address, incarnation="i1")
            )
            reply = await client._amm_stub().UnregisterWorker(
                control_pb2.UnregisterWorkerRequest(address=address)
            )
        assert (reply.removed, list(reply.lost_keys), reply.lost_key_count) == (True, ["a", "b"], 2)
        assert (await client.status()).totals.lost_keys == 3


async def test_a_worker_restarted_as_a_new_process_loses_what_it_held_on_the_record(
    tmp_path: Path,
) -> None:
    """Before: a restart on the same address before dead-after (a new incarnation) replaced the
    worker's holdings silently, whether it registered again or a poll found the new process."""
    async with amm_and_client(tmp_path) as (amm, client):
        assert amm.manager is not None
        host = _Worker("i1", {"kept": DATA, "solo": DATA})  # type: ignore[abstract]
        async with fake_peer(host) as address:
            await amm.manager.register(address, "w", "i1")
            assert set(await client.who_has()) == {"kept", "solo"}
            # Registered again as a new process that still has one key (a snapshot restore).
            host.incarnation, host.keys = "i2", {"kept": DATA}
            await amm.manager.register(address, "w", "i2")
            await client.who_has()
            assert [k.key for k in await client.lost_keys()] == ["solo"]
            (lost,) = await client.lost_keys()
            assert "restarted (registered again as a new process)" in lost.reason
            # Restarted again, found by a poll before it registers: kept is gone too.
            host.incarnation, host.keys = "i3", {}
            await client.amm.run_once()
            (lost,) = await client.lost_keys("kept")
            assert "restarted (a poll found a new process)" in lost.reason
            assert (await client.status()).totals.lost_keys == 2
            # The key comes back: recovered, and the record goes.
            host.keys = {"kept": DATA}
            await client.amm.run_once()
            assert [k.key for k in await client.lost_keys()] == ["solo"]
            assert "key-recovered" in await kinds(client)


async def _storing(client: AsyncClient, address: str, incarnation: str, *keys: str) -> None:
    """What an agent asks before it stores ``keys`` for a Put (``Node.admit``)."""
    await client._amm_stub().LookupKeys(
        control_pb2.LookupKeysRequest(
            keys=keys,
            storing=control_pb2.PutIntent(worker=address, incarnation=incarnation),
        )
    )


async def test_a_put_acknowledged_before_any_poll_saw_it_is_lost_on_the_record(
    tmp_path: Path,
) -> None:
    """Before: a key put on an agent that went away before the AMM's next poll listed it was
    lost with no record at all (chaos 2:101 and 2:106: a SIGKILL 30 ms after the Put). The
    agent's question before it stores the key is noted until a poll lists it."""
    async with amm_and_client(tmp_path) as (amm, client):
        assert amm.manager is not None
        host = _Worker("i1", {})  # type: ignore[abstract]
        async with fake_peer(host) as address:
            await amm.manager.register(address, "w", "i1")
            await _storing(client, address, "i1", "solo", "listed")
            host.keys = {"solo": DATA, "listed": DATA}  # stored and acknowledged, not polled
            # Gone as a new process with nothing: both keys had their one copy there.
            host.incarnation, host.keys = "i2", {}
            await amm.manager.register(address, "w", "i2")
            await client.who_has()
            assert sorted(k.key for k in await client.lost_keys()) == ["listed", "solo"]
            (lost, _) = await client.lost_keys()
            assert "restarted (registered again as a new process)" in lost.reason
            # A note ends when a poll lists the key: once listed, only its holder's record counts.
            await _storing(client, address, "i2", "kept")
            host.keys = {"kept": DATA}
            await client.who_has(fresh=True)
            assert len(amm.manager.storing) == 0
            # A question of another incarnation, or of a worker the AMM does not know, is not
            # noted: its removal would not be that process's.
            await _storing(client, address, "i1", "stale")
            await _storing(client, "127.0.0.1:1", "i9", "nobody")
            assert len(amm.manager.storing) == 0
            # Unregistered (or declared dead) before a poll: the same record.
            await _storing(client, address, "i2", "late")
            reply = await client._amm_stub().UnregisterWorker(
                control_pb2.UnregisterWorkerRequest(address=address)
            )
            assert sorted(reply.lost_keys) == ["kept", "late"]


async def test_a_lost_key_with_a_goal_says_so_once_and_forget_clears_both(
    tmp_path: Path,
) -> None:
    """Before: after its data was gone, a goal showed "below" for ever, with no event."""
    async with amm_and_client(tmp_path) as (_, client):
        host = _Worker("i1", {"g": DATA})  # type: ignore[abstract]
        async with fake_peer(host) as address:
            await client._amm_stub().RegisterWorker(
                control_pb2.RegisterWorkerRequest(address=address, incarnation="i1")
            )
            await client.replicate("g", n=2)
            (goal,) = await client.goals()
            assert not goal.lost
            await client._amm_stub().UnregisterWorker(
                control_pb2.UnregisterWorkerRequest(address=address)
            )
        (goal,) = await client.goals()
        assert goal.lost
        (lost,) = await client.lost_keys()
        assert lost.has_goal
        for _ in range(3):
            await client.amm.run_once()
        events = await kinds(client)
        assert events.count("goal-lost") == 1
        assert events.index("goal-lost") < events.index("key-lost")  # newest first
        assert await client.forget("g") == 0
        assert await client.goals() == []
        assert await client.lost_keys() == []
        assert (await client.status()).totals.lost_keys == 0


async def restart(config: AmmConfig) -> AmmServer:
    amm = AmmServer(config)
    await amm.start()
    return amm


async def test_keys_lost_while_the_amm_was_down_are_found_and_the_record_survives_restarts(
    tmp_path: Path,
) -> None:
    """Before: a worker that died while the AMM was down, or came back without its keys, lost
    them in silence; and the lost list lived in memory only, so an AMM restart forgot it."""
    config = amm_config(tmp_path, dead_after="400ms", stale_after="100ms", poll_timeout="200ms")
    gone_port, back_port = free_port(), free_port()
    amm = await restart(config)
    try:
        agents: list[Agent] = []
        for port in (gone_port, back_port, free_port()):
            agent = Agent(_config(amm.address, port))
            await agent.start()
            agents.append(agent)
        gone, back, stays = agents
        await wait_for(lambda: all(a.registered for a in agents), what="registered")
        for agent, key in ((gone, "gone-only"), (back, "back-only"), (stays, "stays")):
            async with dial(agent.address) as stub:
                await put(stub, key, DATA)
        async with AsyncClient(amm.address, timeout=10) as client:
            assert set(await client.who_has()) == {"gone-only", "back-only", "stays"}
    finally:
        await amm.stop()
    # While the AMM is down: one worker dies for good, another comes back as a new process.
    await gone.stop()
    await back.stop()
    back = Agent(_config(amm.address, back_port))
    await back.start()
    amm = await restart(config)
    try:
        async with AsyncClient(amm.address, timeout=10) as client:

            async def cycle_then_lost() -> list[str]:
                await client.amm.run_once()
                return [k.key for k in await client.lost_keys()]

            lost = await wait_for(cycle_then_lost, lambda ks: len(ks) == 2, what="lost keys")
            assert lost == ["back-only", "gone-only"]
            (record, _) = await client.lost_keys()
            assert record.worker == ""
            assert "no worker held it after the AMM restarted" in record.reason
            assert await client.who_has("stays") == {"stays": (stays.address,)}
    finally:
        await amm.stop()
    # The record is in the state file: a third AMM still reports both, until one is forgotten.
    amm = await restart(config)
    try:
        async with AsyncClient(amm.address, timeout=10) as client:
            assert (await client.status()).totals.lost_keys == 2
            assert await client.forget("gone-only") == 0
    finally:
        await amm.stop()
    amm = await restart(config)
    try:
        async with AsyncClient(amm.address, timeout=10) as client:
            assert [k.key for k in await client.lost_keys()] == ["back-only"]
    finally:
        await amm.stop()
        await back.stop()
        await stays.stop()


def _config(amm: str, port: int) -> Any:
    from worker_agent.config import AgentConfig

    return AgentConfig(amm=amm, listen=f"127.0.0.1:{port}", register_backoff_max=0.2)


async def test_list_lost_pages_and_rejects_bad_limits(tmp_path: Path) -> None:
    async with amm_and_client(tmp_path) as (_, client):
        keys = {f"k{i:02d}": DATA for i in range(25)}
        async with fake_peer(_Worker("i1", keys)) as address:  # type: ignore[abstract]
            stub = client._amm_stub()
            await stub.RegisterWorker(
                control_pb2.RegisterWorkerRequest(address=address, incarnation="i1")
            )
            await client.who_has()
            await stub.UnregisterWorker(control_pb2.UnregisterWorkerRequest(address=address))
        page = await stub.ListLost(control_pb2.ListLostRequest(limit=10))
        assert ([k.key for k in page.lost][::9], page.total) == (["k00", "k09"], 25)
        page = await stub.ListLost(control_pb2.ListLostRequest(limit=10, after="k19"))
        assert [k.key for k in page.lost] == [f"k{i}" for i in range(20, 25)]
        page = await stub.ListLost(control_pb2.ListLostRequest(keys=["k03", "nope"]))
        assert ([k.key for k in page.lost], page.total) == (["k03"], 1)
        assert len(await client.lost_keys()) == 25
        assert len(await client.lost_keys(limit=3)) == 3
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListLost(control_pb2.ListLostRequest(limit=200_000))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListLost(control_pb2.ListLostRequest(keys=[""]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
