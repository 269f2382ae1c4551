"""The shared metrics plumbing: duration buckets, reading on the event loop from the scrape
thread, the HTTP server (plain and mutual TLS), and the --metrics-listen settings."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from amm.base.metrics import (
    LoopCollector,
    MetricsServer,
    call_on_loop,
    new_registry,
    split_listen,
)
from amm.base.security import Role, Security, init_directory
from amm.base.tally import Durations
from amm_service.config import ConfigError, load_config
from worker_agent.__main__ import build_parser, config_from_args
from worker_agent.config import AgentConfig


def test_durations_fall_in_the_first_bucket_whose_bound_is_not_below_them() -> None:
    durations = Durations((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 7.0):
        durations.observe(seconds)
    assert durations.counts == [2, 2, 1]
    assert durations.cumulative() == [(0.1, 2), (1.0, 4), (float("inf"), 5)]
    assert durations.count == 5
    assert durations.sum == pytest.approx(8.65)
    with pytest.raises(ValueError, match="increasing"):
        Durations((1.0, 0.5))


@pytest.fixture
def loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own, as the servers' loop is to a scrape."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_a_read_runs_on_the_loop_and_hands_back_its_result_or_error(
    loop_thread: asyncio.AbstractEventLoop,
) -> None:
    def on_which_loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    assert call_on_loop(loop_thread, on_which_loop, 5) is loop_thread

    def broken() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        call_on_loop(loop_thread, broken, 5)


def test_a_loop_that_does_not_answer_fails_the_read_in_time(
    loop_thread: asyncio.AbstractEventLoop,
) -> None:
    release = threading.Event()
    loop_thread.call_soon_threadsafe(release.wait)  # the loop is stuck in this callback
    try:
        with pytest.raises(TimeoutError, match="did not answer"):
            call_on_loop(loop_thread, lambda: 1, 0.1)
    finally:
        release.set()
    assert call_on_loop(loop_thread, lambda: 2, 5) == 2, "the loop answers once free again"


async def test_a_read_from_the_loop_itself_runs_at_once() -> None:
    assert call_on_loop(asyncio.get_running_loop(), lambda: 3, 0.1) == 3


def test_listen_addresses_are_host_and_port() -> None:
    assert split_listen("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert split_listen("[::1]:0") == ("::1", 0)
    for bad in ("9100", "host:", "host:70000", ":9100"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            split_listen(bad)


def _registry_with(value: float) -> CollectorRegistry:
    registry = CollectorRegistry()

    class One(Collector):
        def collect(self) -> Iterator[GaugeMetricFamily]:
            yield GaugeMetricFamily("amm_test_value", "A test value", value=value)

    registry.register(One())
    return registry


def _get(url: str, context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return str(response.read().decode())


def test_the_server_serves_its_registry_and_stops() -> None:
    server = MetricsServer("127.0.0.1:0", _registry_with(7))
    try:
        assert "amm_test_value 7.0" in _get(f"http://{server.address}/metrics")
    finally:
        server.stop()
    server.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        _get(f"http://{server.address}/metrics")


def test_a_port_in_use_is_an_oserror_that_names_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(OSError, match=f"cannot serve metrics on {address}"):
            MetricsServer(address, CollectorRegistry())


def _mutual_tls_server(certs: Path) -> MetricsServer:
    """A server on a fresh ``amm certs init`` directory, asking scrapers for a certificate."""
    init_directory(certs, sans=["127.0.0.1"], days=1)
    return MetricsServer(
        "127.0.0.1:0",
        _registry_with(1),
        certfile=str(certs / "amm.pem"),
        keyfile=str(certs / "amm-key.pem"),
        client_cafile=str(certs / "ca.pem"),
    )


def test_the_server_can_require_client_certificates(tmp_path: Path) -> None:
    """Mutual TLS with certificates of ``amm certs init``: the scraper shows one of the CA's."""
    certs = tmp_path / "certs"
    server = _mutual_tls_server(certs)
    try:
        url = f"https://{server.address}/metrics"
        scraper = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        scraper.load_cert_chain(str(certs / "reader.pem"), str(certs / "reader-key.pem"))
        assert "amm_test_value 1.0" in _get(url, scraper)
        anonymous = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _get(url, anonymous)
    finally:
        server.stop()


def _presented_serial(address: str, context: ssl.SSLContext) -> int:
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_the_server_follows_a_rotation_of_its_certificate(tmp_path: Path) -> None:
    """A re-issued certificate is presented from the next connection on, without a restart."""
    certs = tmp_path / "certs"
    server = _mutual_tls_server(certs)
    try:
        scraper = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        scraper.load_cert_chain(str(certs / "reader.pem"), str(certs / "reader-key.pem"))

        def serial_of_file() -> int:
            return x509.load_pem_x509_certificate((certs / "amm.pem").read_bytes()).serial_number

        before = serial_of_file()
        assert _presented_serial(server.address, scraper) == before
        Security.from_dir(certs).issue(Role.AMM, "amm", sans=("127.0.0.1",))
        assert serial_of_file() != before
        assert _presented_serial(server.address, scraper) == serial_of_file()
        assert "amm_test_value 1.0" in _get(f"https://{server.address}/metrics", scraper)
    finally:
        server.stop()


def test_a_loop_collector_with_the_process_collector_in_one_registry(
    loop_thread: asyncio.AbstractEventLoop,
) -> None:
    registry = new_registry()
    registry.register(
        LoopCollector(loop_thread, lambda: [GaugeMetricFamily("amm_x", "x", value=2)])
    )
    names = {family.name for family in registry.collect()}
    assert {"amm_x", "process_resident_memory_bytes"} <= names


def test_the_amm_takes_metrics_listen_from_flags_and_environment() -> None:
    assert load_config(env={}).metrics_listen is None
    config = load_config(env={"AMM_METRICS_LISTEN": "0.0.0.0:9100"})
    assert config.metrics_listen == "0.0.0.0:9100"
    config = load_config(env={}, overrides={"metrics_listen": "[::1]:9100"})
    assert config.metrics_listen == "[::1]:9100"
    with pytest.raises(ConfigError, match=r"invalid metrics_listen '9100' \(from --metrics-listen"):
        load_config(env={}, overrides={"metrics_listen": "9100"})


def test_the_agent_takes_metrics_listen_from_its_flag() -> None:
    args = build_parser().parse_args(["--metrics-listen", "0.0.0.0:9100"])
    assert config_from_args(args).metrics_listen == "0.0.0.0:9100"
    assert config_from_args(build_parser().parse_args([])).metrics_listen is None
    with pytest.raises(ValueError, match="metrics_listen must be HOST:PORT"):
        AgentConfig(metrics_listen="9100")
