"""The client and the CLI against a real local cluster (service and agent processes).

Cycles are driven by ``run_once`` except where the point is that the AMM runs on its own, and
positives are awaited with ``poll_until``. One cluster serves the module, so each test uses keys
of its own. A corrupt agent, which no real agent can be made into, is a tiny lying servicer;
so are holders that drop a key between the AMM's answer and the read, a race no real cluster
loses on cue.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from amm import AmmError, AsyncClient, Client
from amm.base.checksum import checksum
from amm.cli import main as cli_main
from amm.cluster import LocalCluster
from amm.models import GoalChange, ReplicationGoal, sort_addresses
from amm.v1 import agent_pb2, agent_pb2_grpc, control_pb2, control_pb2_grpc, types_pb2
from tests.support.processes import local_cluster
from tests.support.waiting import poll_until


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with local_cluster(2) as c:
        yield c


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster.address, timeout=10) as c:
        c.amm.stop()
        yield c
        c.amm.stop()


def test_the_dask_style_example(client: Client, cluster: LocalCluster) -> None:
    w1, w2 = client.has_what()
    assert [w1, w2] == sort_addresses(cluster.workers)
    client.put("example", b"payload", workers=[w1])
    assert client.has_what()[w1] == ("example",)
    assert client.get("example", worker=w2) == b"payload"
    assert client.who_has("example") == {"example": (w1, w2)}
    client.amm.start()
    assert client.amm.running() is True
    client.amm.stop()
    assert client.amm.running() is False
    report = client.amm.run_once()
    assert report.number > 0
    poll_until(lambda: len(client.who_has("example")["example"]) == 1, what="one replica left")


def test_running_amm_drops_the_duplicate_by_itself(client: Client) -> None:
    w1, w2 = client.has_what()
    client.put("dup", b"v" * 10_000, workers=[w1, w2])
    client.amm.start()

    def single_holder() -> tuple[str, ...] | None:
        holders = client.who_has("dup")["dup"]
        return holders if len(holders) == 1 else None

    holders = poll_until(single_holder, what="the duplicate dropped")
    assert holders[0] in (w1, w2)


def test_put_and_get_without_naming_workers(client: Client) -> None:
    value = bytes(range(256)) * 9000
    client.put("anywhere", value)
    (holder,) = client.who_has("anywhere")["anywhere"]
    assert client.get("anywhere") == value
    assert client.who_has("anywhere")["anywhere"] == (holder,)
    client.forget("anywhere")


def test_put_many_broadcasts_to_the_workers_named_or_spreads_over_all(client: Client) -> None:
    w1, w2 = client.has_what()
    items = {f"many-{i}": f"value {i}".encode() for i in range(1000)}
    result = client.put_many(items, workers=[w1, w2])
    assert (result.created, result.unchanged, result.workers) == (2000, 0, (w1, w2))
    assert set(client.who_has(list(items)).values()) == {(w1, w2)}
    assert client.forget(list(items)) == 2000
    spread = client.put_many(items.items())
    assert (spread.created, sorted(spread.workers)) == (1000, [w1, w2])
    held = client.has_what()
    assert [sum(k.startswith("many-") for k in held[w]) for w in (w1, w2)] == [500, 500]
    assert client.forget(list(items)) == 1000


def test_status_workers_and_errors(client: Client, cluster: LocalCluster) -> None:
    status = client.status()
    assert status.totals.workers == 2
    assert [p.name for p in status.policies]
    workers = client.workers(fresh=True)
    assert [w.address for w in workers] == sort_addresses(cluster.workers)
    assert all(w.status == "running" and w.last_poll is not None for w in workers)
    with pytest.raises(AmmError) as info:
        client.who_has(["no-such-key"])
    assert info.value.status == grpc.StatusCode.NOT_FOUND


def test_pin_and_unpin(client: Client) -> None:
    w1, _ = client.has_what()
    client.put("pinned", b"p", workers=[w1])
    assert client.pin("pinned", w1) == 1
    assert client.unpin("pinned", w1) == 0
    client.forget("pinned")


def test_stopped_worker_leaves_the_cluster(cluster: LocalCluster, client: Client) -> None:
    extra = cluster.add_worker()
    assert extra in client.has_what()
    assert cluster.stop_worker(extra, signal.SIGTERM) == 0
    poll_until(lambda: extra not in client.has_what(), what="the worker unregistered")
    with pytest.raises(AmmError) as info:
        client.get("anything", worker=extra)
    assert info.value.status == grpc.StatusCode.UNAVAILABLE
    assert extra in info.value.message


async def test_async_client(cluster: LocalCluster) -> None:
    async with AsyncClient(cluster.address, timeout=10) as client:
        w1, _ = await client.has_what()
        await client.put("async", b"value", workers=[w1])
        assert await client.get("async") == b"value"
        assert await client.forget("async") == 1


def test_cli_verbs(cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    amm = ["--amm", cluster.address]
    w1 = sort_addresses(cluster.workers)[0]
    assert cli_main([*amm, "put", "cli", "--value", "text", "--worker", w1]) == 0
    assert cli_main([*amm, "who-has", "cli"]) == 0
    assert cli_main([*amm, "workers"]) == 0
    assert cli_main([*amm, "status"]) == 0
    assert cli_main([*amm, "run-once"]) == 0
    out = capsys.readouterr().out
    assert f"cli  {w1}" in out
    assert "ADDRESS" in out
    assert "cycle" in out
    assert cli_main([*amm, "forget", "cli"]) == 0
    assert cli_main([*amm, "who-has", "cli"]) == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: ")


def test_replicate_goals_through_client_and_cli(
    client: Client, cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    w1, w2 = client.has_what()
    client.put("goal", b"g" * 1000, workers=[w1])
    assert client.replicate("goal") == GoalChange(goals_set=1, goals_removed=0)
    assert client.goals() == [ReplicationGoal("goal", n=None, target=2, live_copies=1)]
    assert client.status().totals.keys_below_goal == 1
    report = client.amm.run_once()
    assert [(d.op, d.worker) for d in report.directives if d.key == "goal"] == [("replicate", w2)]
    assert client.who_has("goal")["goal"] == (w1, w2)
    amm = ["--amm", cluster.address]
    assert cli_main([*amm, "goals"]) == 0
    assert cli_main([*amm, "status"]) == 0
    out = capsys.readouterr().out
    assert "goal   all       2     2  met" in out
    assert "1 key (0 below)" in out
    assert cli_main([*amm, "goals", "goal", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"key": "goal", "n": None, "target": 2, "live_copies": 2, "lost": False}
    ]
    assert cli_main([*amm, "replicate", "goal", "-n", "1"]) == 0
    assert capsys.readouterr().out == "goal removed for 1 key\n"
    report = client.amm.run_once()
    assert [d.op for d in report.directives if d.key == "goal"] == ["drop"]

    def one_copy_left() -> bool:
        if len(client.who_has("goal")["goal"]) == 1:
            return True
        client.amm.run_once()  # a drop refused under load is asked again
        return False

    poll_until(one_copy_left, what="one copy left")
    assert cli_main([*amm, "replicate", "goal", "-n", "0"]) == 1
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: n = 0 is not a goal")
    assert cli_main([*amm, "replicate", "ghost", "-n", "2"]) == 1
    assert capsys.readouterr().err == "error: NOT_FOUND: unknown key(s): 'ghost'\n"
    assert cli_main([*amm, "goals", "goal"]) == 1
    assert "no replication goal" in capsys.readouterr().err
    with pytest.raises(AmmError) as info:
        client.replicate("goal", n=-1)
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT
    client.forget("goal")


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class _LyingAgent(agent_pb2_grpc.WorkerAgentServicer):
    """Announces the checksum of b"value" and sends other bytes."""

    def Get(self, request: Any, context: Any) -> Iterator[agent_pb2.GetResponse]:
        header = types_pb2.ValueHeader(key=request.key, size=5, checksum=checksum(b"value"))
        yield agent_pb2.GetResponse(header=header)
        yield agent_pb2.GetResponse(chunk=b"VALUE")


@pytest.fixture
def liar() -> Iterator[str]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    agent_pb2_grpc.add_WorkerAgentServicer_to_server(_LyingAgent(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_get_verifies_the_announced_checksum(client: Client, liar: str) -> None:
    with pytest.raises(AmmError) as info:
        client.get("k", worker=liar)
    assert info.value.status == grpc.StatusCode.DATA_LOSS


@contextlib.contextmanager
def _serving(add: Callable[[Any, grpc.Server], None], servicer: Any) -> Iterator[str]:
    """A sync gRPC server for one servicer on 127.0.0.1:0; yields its address."""
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


class _ScriptedAmm(control_pb2_grpc.ActiveMemoryManagerServicer):
    """Lists ``holders`` for every key asked, as a real AMM whose answer is already stale;
    records the seconds each call had left before its deadline."""

    def __init__(self, holders: list[str]) -> None:
        self.holders = holders
        self.deadlines: dict[str, float] = {}

    def Running(self, request: Any, context: grpc.ServicerContext) -> control_pb2.RunningResponse:
        self.deadlines["Running"] = context.time_remaining() or 0.0
        return control_pb2.RunningResponse(running=False)

    def RunOnce(self, request: Any, context: grpc.ServicerContext) -> control_pb2.RunOnceResponse:
        self.deadlines["RunOnce"] = context.time_remaining() or 0.0
        return control_pb2.RunOnceResponse(cycle=types_pb2.CycleReport(number=7))

    def WhoHas(self, request: Any, context: Any) -> control_pb2.WhoHasResponse:
        entries = [control_pb2.KeyHolders(key=k, workers=self.holders) for k in request.keys]
        return control_pb2.WhoHasResponse(entries=entries)


class _ScriptedAgent(agent_pb2_grpc.WorkerAgentServicer):
    """Answers each Get with the next of the shared ``answers``: None for NOT_FOUND."""

    def __init__(self, answers: list[bytes | None], calls: list[int]) -> None:
        self.answers, self.calls = answers, calls

    def Get(self, request: Any, context: grpc.ServicerContext) -> Iterator[agent_pb2.GetResponse]:
        self.calls.append(1)
        value = self.answers.pop(0)
        if value is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown key: {request.key!r}")
        header = types_pb2.ValueHeader(key=request.key, size=len(value), checksum=checksum(value))
        yield agent_pb2.GetResponse(header=header)
        yield agent_pb2.GetResponse(chunk=value)


@contextlib.contextmanager
def _two_holders(answers: list[bytes | None], calls: list[int]) -> Iterator[str]:
    """An AMM listing two agents that answer from ``answers``, whichever is asked first."""
    with (
        _serving(
            agent_pb2_grpc.add_WorkerAgentServicer_to_server,
            _ScriptedAgent(answers, calls),  # type: ignore[abstract]
        ) as a,
        _serving(
            agent_pb2_grpc.add_WorkerAgentServicer_to_server,
            _ScriptedAgent(answers, calls),  # type: ignore[abstract]
        ) as b,
        _serving(
            control_pb2_grpc.add_ActiveMemoryManagerServicer_to_server,
            _ScriptedAmm([a, b]),  # type: ignore[abstract]
        ) as amm,
    ):
        yield amm


def test_get_tries_the_next_holder_when_one_dropped_the_key() -> None:
    calls: list[int] = []
    with _two_holders([None, b"value"], calls) as amm, Client(amm, timeout=5) as client:
        assert client.get("k") == b"value"
    assert len(calls) == 2


def test_get_is_not_found_when_every_holder_dropped_the_key() -> None:
    calls: list[int] = []
    with (
        _two_holders([None, None], calls) as amm,
        Client(amm, timeout=5) as client,
        pytest.raises(AmmError) as info,
    ):
        client.get("k")
    assert info.value.status == grpc.StatusCode.NOT_FOUND
    assert len(calls) == 2


def test_run_once_outlasts_the_amms_directive_timeout() -> None:
    scripted = _ScriptedAmm([])  # type: ignore[abstract]
    with (
        _serving(control_pb2_grpc.add_ActiveMemoryManagerServicer_to_server, scripted) as amm,
        Client(amm, timeout=5) as client,
    ):
        assert client.amm.run_once().number == 7
        assert client.amm.running() is False
    assert scripted.deadlines["RunOnce"] > 55
    assert scripted.deadlines["Running"] < 10  # 5 s, give or take the clocks


def test_put_without_workers_picks_the_least_managed_memory(client: Client) -> None:
    w1, w2 = client.has_what()
    client.put("heavy", b"h" * 100_000, workers=[w1])
    client.put("light", b"l")
    assert client.who_has("light") == {"light": (w2,)}
    client.forget(["heavy", "light"])


def test_put_to_no_workers_is_refused_not_silently_dropped(client: Client) -> None:
    with pytest.raises(AmmError) as info:
        client.put("nowhere", b"v", workers=[])
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message == "no workers given"
    with pytest.raises(AmmError) as info:
        client.who_has("nowhere")
    assert info.value.status == grpc.StatusCode.NOT_FOUND


def test_put_to_one_address_given_as_a_string(client: Client) -> None:
    _, w2 = client.has_what()
    client.put("one-address", b"v", workers=w2)
    assert client.who_has("one-address") == {"one-address": (w2,)}
    client.forget("one-address")


def test_server_errors_keep_their_status(client: Client) -> None:
    w1, _ = client.has_what()
    client.put("immutable", b"one", workers=[w1])
    client.put("immutable", b"one", workers=[w1])  # same content: a no-op
    with pytest.raises(AmmError) as info:
        client.put("immutable", b"two", workers=[w1])
    assert info.value.status == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(AmmError) as info:
        client.has_what([_closed_port()])
    assert info.value.status == grpc.StatusCode.NOT_FOUND
    with pytest.raises(AmmError) as info:
        client.unpin("immutable", w1)
    assert info.value.status == grpc.StatusCode.FAILED_PRECONDITION
    client.forget("immutable")


def test_unreachable_addresses_name_the_address() -> None:
    address = _closed_port()
    with Client(address, timeout=5) as client:
        with pytest.raises(AmmError) as info:
            client.amm.running()
        assert info.value.status == grpc.StatusCode.UNAVAILABLE
        assert address in info.value.message
        with pytest.raises(AmmError) as info:
            client.get("k", worker=address)
        assert info.value.status == grpc.StatusCode.UNAVAILABLE
        assert info.value.message.startswith(f"worker at {address}: ")


def test_closed_client_refuses_calls_and_close_is_idempotent(cluster: LocalCluster) -> None:
    client = Client(cluster.address)
    client.close()
    client.close()
    with pytest.raises(AmmError) as info:
        client.amm.running()
    assert info.value.status == grpc.StatusCode.FAILED_PRECONDITION


def test_clients_opened_and_closed_leave_no_threads(cluster: LocalCluster) -> None:
    w1 = cluster.workers[0]

    def use_one_client() -> None:
        with Client(cluster.address, timeout=10) as client:
            assert client.amm.running() is False
            with pytest.raises(AmmError):
                client.get("no-such-key", worker=w1)

    use_one_client()  # whatever grpc starts once per process
    baseline = set(threading.enumerate())
    for _ in range(20):
        use_one_client()

    # Counted, not compared by identity: grpc may replace its own poller thread (_poll_wrapper)
    # when the last aio object of a loop goes, which is no leak; 20 leaked clients would show.
    poll_until(lambda: threading.active_count() <= len(baseline), what="thread count at baseline")


def test_cli_files_tables_json_and_errors(
    cluster: LocalCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    amm = ["--amm", cluster.address]
    w1, w2 = sort_addresses(cluster.workers)
    source, target = tmp_path / "in.bin", tmp_path / "out.bin"
    source.write_bytes(bytes(range(256)))
    assert cli_main([*amm, "put", "file", "--file", str(source), "--worker", w1]) == 0
    assert capsys.readouterr().out == f"stored 'file' (256 B) on {w1}\n"
    assert cli_main([*amm, "get", "file", "--worker", w2, "-o", str(target)]) == 0
    assert target.read_bytes() == bytes(range(256))
    capsys.readouterr()
    assert cli_main([*amm, "who-has", "file", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"file": [w1, w2]}
    assert cli_main([*amm, "running", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"running": False}
    assert cli_main([*amm, "run-once", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["directives_sent"] == 1
    assert cli_main([*amm, "who-has", "missing"]) == 1
    assert capsys.readouterr().err == "error: NOT_FOUND: unknown key(s): 'missing'\n"
    assert cli_main([*amm, "put", "k", "--file", str(tmp_path / "absent")]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert cli_main(["--amm", _closed_port(), "--timeout", "5", "status"]) == 1
    assert "error: UNAVAILABLE: " in capsys.readouterr().err
    poll_until(lambda: len(cluster_holders(cluster, "file")) == 1, what="one replica left")


def cluster_holders(cluster: LocalCluster, key: str) -> tuple[str, ...]:
    with Client(cluster.address, timeout=10) as client:
        return client.who_has(key)[key]
