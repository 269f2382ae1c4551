"""The dashboard's HTTP server, in process: its routes, the history it serves, and who may see it
(loopback only without TLS; with TLS, a client certificate of the cluster CA allowed to read the
status)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from amm.base.security import Role, Security, SecurityError
from amm.base.security.files import write_atomic
from amm.client import AsyncClient
from amm_service.api import dashboard as dashboard_module
from amm_service.api.dashboard import Dashboard
from amm_service.api.server import AmmServer
from amm_service.runtime.observe.history import WORKER_FIELDS, History
from tests.conftest import amm_config
from tests.support.waiting import wait_for
from worker_agent.agent import Agent
from worker_agent.config import AgentConfig

LOOPBACK = "127.0.0.1:0"


def fetch(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


async def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str, bytes]:
    return await asyncio.to_thread(fetch, url, context)


async def get_json(url: str, context: ssl.SSLContext | None = None) -> Any:
    code, kind, body = await get(url, context)
    assert (code, kind) == (200, "application/json"), body
    return json.loads(body)


async def test_the_page_its_files_and_the_history_of_a_running_cluster(tmp_path: Path) -> None:
    config = amm_config(tmp_path, dashboard_listen=LOOPBACK, start=True, interval="100ms")
    async with (
        AmmServer(config) as amm,
        Agent(AgentConfig(amm=amm.address, listen=LOOPBACK, name="w1")),
    ):
        assert amm.dashboard is not None
        base = f"http://{amm.dashboard.address}"
        code, kind, page = await get(base + "/")
        assert (code, kind) == (200, "text/html; charset=utf-8")
        assert b"/static/dashboard.js" in page
        for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            code, got, body = await get(f"{base}/static/{name}")
            assert code == 200
            assert got.startswith(kind)
            assert body
        assert (await get(base + "/static/../server.py"))[0] == 404
        assert (await get(base + "/nothing"))[0] == 404
        assert (await get(base + "/api/history?after=soon"))[0] == 400

        def sampled_w1(history: Any) -> bool:
            return any(w[0] == "w1" for s in history["samples"] for w in s["workers"])

        history = await wait_for(
            lambda: get_json(base + "/api/history?after=0"), sampled_w1, what="w1 sampled"
        )
        samples = history["samples"]
        cycles = [s["cycle"] for s in samples]
        assert cycles == sorted(cycles)
        last = samples[-1]
        newer = await get_json(f"{base}/api/history?after={last['at']}")
        assert all(s["at"] > last["at"] for s in newer["samples"])
        [w1] = [dict(zip(WORKER_FIELDS, w, strict=True)) for w in last["workers"] if w[0] == "w1"]
        assert w1["status"] == "running"
        assert w1["process"] > 0
        status = await get_json(base + "/api/status")
        assert status["running"] is True
        assert int(status["totals"]["workers"]) == 1
        assert int(status["cycles"]) >= last["cycle"]


async def test_a_stopped_amm_keeps_sampling_memory_and_sends_nothing(tmp_path: Path) -> None:
    """The AMM-off half of the picture: while the AMM is stopped, the history keeps gaining
    samples of what the agents hold, marked not running, and the AMM plans and sends nothing
    (a key held twice, which a cycle would reduce to one copy, keeps both)."""
    config = amm_config(tmp_path, dashboard_listen=LOOPBACK, start=False, interval="100ms")
    async with (
        AmmServer(config) as amm,
        Agent(AgentConfig(amm=amm.address, listen=LOOPBACK, name="w1")) as w1,
        Agent(AgentConfig(amm=amm.address, listen=LOOPBACK, name="w2")) as w2,
        AsyncClient(amm.address, timeout=20) as client,
    ):
        assert amm.dashboard is not None
        base = f"http://{amm.dashboard.address}"
        agents = {"w1": w1, "w2": w2}
        await client.put("twice", b"x" * 200_000, [w1.node.address, w2.node.address])
        put_at = time.time()

        def agrees(sample: dict[str, Any]) -> bool:
            workers = {w[0]: dict(zip(WORKER_FIELDS, w, strict=True)) for w in sample["workers"]}
            return set(workers) == set(agents) and all(
                workers[name]["managed"] == agent.node.sample_memory().managed == 200_000
                and workers[name]["process"] > 0
                for name, agent in agents.items()
            )

        def sampled_after_put(history: Any) -> bool:
            return any(s["at"] > put_at and agrees(s) for s in history["samples"])

        first = await wait_for(
            lambda: get_json(f"{base}/api/history?after={put_at}"),
            sampled_after_put,
            what="a sample of both agents holding the key",
        )
        seen = first["samples"][-1]["at"]
        later = await wait_for(
            lambda: get_json(f"{base}/api/history?after={seen}"),
            lambda history: len(history["samples"]) >= 5,
            what="five more samples while the AMM is stopped",
        )
        samples = first["samples"] + later["samples"]
        assert all(s["running"] is False for s in samples)
        assert all(agrees(s) for s in later["samples"])
        assert all((s["replicated"], s["dropped"], s["refused"]) == (0, 0, 0) for s in samples)
        status = await client.status()
        assert (status.running, status.cycles, status.totals.directives_sent) == (False, 0, 0)
        assert all("twice" in agent.store for agent in agents.values())


async def test_without_tls_it_refuses_an_address_other_machines_reach(tmp_path: Path) -> None:
    config = amm_config(tmp_path, dashboard_listen="0.0.0.0:0")
    with pytest.raises(SecurityError, match=r"refusing to listen on 0\.0\.0\.0:0 without TLS"):
        async with AmmServer(config):
            pass


def client_context(certs: Security, identity: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.check_hostname = False  # the AMM's certificate names amm.amm, not 127.0.0.1
    if identity is not None:
        me = certs.as_identity(identity)
        assert me.cert is not None
        assert me.key is not None
        context.load_cert_chain(me.cert, me.key)
    return context


async def test_with_tls_it_serves_https_to_readers_and_operators_only(tmp_path: Path) -> None:
    certs = Security.temporary(tmp_path / "certs")
    certs.issue(Role.AGENT, "w9")
    config = amm_config(tmp_path, dashboard_listen=LOOPBACK, tls=str(certs.directory))
    async with AmmServer(config) as amm:
        assert amm.dashboard is not None
        url = f"https://{amm.dashboard.address}/api/status"
        for reader in ("reader", "operator"):
            status = await get_json(url, client_context(certs, reader))
            assert status["epoch"] == str(amm.epoch)
        code, _, body = await get(url, client_context(certs, "w9"))
        assert code == 403
        assert b"needs role reader or operator; you are agent 'w9'" in body
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            await get(url, client_context(certs, None))
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            await get(f"http://{amm.dashboard.address}/api/status")
        (certs.directory / "revoked").write_text("reader\n")
        code, _, body = await get(url, client_context(certs, "reader"))
        assert code == 403
        assert b"revoked" in body


def context_of(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """A client trusting ``ca`` and presenting ``cert``."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    context.load_cert_chain(cert, key)
    return context


def presented_serial(address: str, context: ssl.SSLContext) -> int:
    """The serial number of the certificate the server at ``address`` presents."""
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as sock,
        context.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


async def test_with_tls_it_follows_a_rotation_without_a_restart(tmp_path: Path) -> None:
    """A re-issued certificate is presented, and a replaced CA trusted, from the next
    connection on, as the gRPC ports do."""
    certs = Security.temporary(tmp_path / "certs")
    folder = certs.directory
    config = amm_config(tmp_path, dashboard_listen=LOOPBACK, tls=str(folder))
    async with AmmServer(config) as amm:
        assert amm.dashboard is not None
        address = amm.dashboard.address
        url = f"https://{address}/api/status"
        reader = client_context(certs, "reader")
        before = serial_of(folder / "amm.pem")
        assert await asyncio.to_thread(presented_serial, address, reader) == before

        certs.issue(Role.AMM, "amm")
        after = serial_of(folder / "amm.pem")
        assert after != before
        assert await asyncio.to_thread(presented_serial, address, reader) == after
        assert (await get_json(url, reader))["epoch"] == str(amm.epoch)

        # A new CA: its reader is let in, the old CA's reader no longer.
        old = tmp_path / "old"
        old.mkdir()
        for name in ("reader.pem", "reader-key.pem"):
            (old / name).write_bytes((folder / name).read_bytes())
        fresh = Security.temporary(tmp_path / "fresh").directory
        for name in ("ca.pem", "amm.pem", "amm-key.pem", "reader.pem", "reader-key.pem"):
            mode = 0o600 if name.endswith("-key.pem") else 0o644
            write_atomic(folder / name, (fresh / name).read_bytes(), mode)
        new_reader = context_of(folder / "ca.pem", folder / "reader.pem", folder / "reader-key.pem")
        assert (await get_json(url, new_reader))["epoch"] == str(amm.epoch)
        old_reader = context_of(folder / "ca.pem", old / "reader.pem", old / "reader-key.pem")
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            await get(url, old_reader)


async def exchange(
    address: str, request: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Send ``request`` on a new connection; the connection and the status line answered."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    return reader, writer, await reader.readline()


async def test_connections_beyond_the_cap_get_a_503_until_one_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dashboard_module, "REQUEST_TIMEOUT", 300.0)  # held idle all along

    async def status() -> dict[str, Any]:
        return {"running": True}

    dashboard = Dashboard(LOOPBACK, History(), status, max_connections=2)
    await dashboard.start()
    held = []
    try:
        request = b"GET /api/status HTTP/1.1\r\nHost: amm\r\n\r\n"
        for _ in range(2):  # both kept alive, as a browser keeps its connections
            reader, writer, line = await exchange(dashboard.address, request)
            assert line.startswith(b"HTTP/1.1 200"), line
            held.append(writer)
        reader, writer, line = await exchange(dashboard.address, request)
        assert line == b"HTTP/1.1 503 Service Unavailable\r\n"
        rest = await asyncio.wait_for(reader.read(), 10)  # and closed
        writer.close()
        assert b"\r\nRetry-After: 1\r\n" in rest
        assert b"Connection: close" in rest
        assert rest.endswith(b"serves 2 connections at once, all in use; try again shortly\n")

        held.pop().close()
        url = f"http://{dashboard.address}/api/status"
        await wait_for(lambda: get(url), lambda r: r[0] == 200, what="served once one closed")
    finally:
        for writer in held:
            writer.close()
        await dashboard.stop()
