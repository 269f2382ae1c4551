"""A whole cluster on mutual TLS, as real processes: the AMM replicates and drops over TLS, an
operator reads everything back, and a client without the cluster's certificates gets nowhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from amm import AmmError, Client
from amm.base.security import Security
from amm.cluster import TLS_VARIABLES
from tests.support.processes import local_cluster
from tests.support.waiting import poll_until


def copies(client: Client, keys: list[str]) -> dict[str, int]:
    holders = client.who_has(keys)
    return {key: len(holders.get(key, ())) for key in keys}


def test_a_tls_cluster_replicates_drops_and_serves_an_operator(tmp_path: Path) -> None:
    with (
        local_cluster(3, tls=True, start=True) as cluster,
        Client(cluster.address, security=cluster.security, timeout=20) as client,
    ):
        assert cluster.certs is not None
        assert cluster.security is not None
        assert sorted(w.name for w in client.workers()) == ["worker-0", "worker-1", "worker-2"]
        first = cluster.workers[0]
        values = {f"tls-{i}": os.urandom(50_000 + i) for i in range(6)}
        keys = list(values)
        client.put_many(values, workers=[first])
        # A goal of three copies: the AMM tells agents to fetch from each other, over TLS.
        client.replicate(keys, n=3)
        poll_until(
            lambda: set(copies(client, keys).values()) == {3},
            within=30,
            what="three copies of every key",
        )
        # No goal: ReduceReplicas drops down to one copy, agents asking each other's promises.
        client.replicate(keys, n=1)
        poll_until(
            lambda: set(copies(client, keys).values()) == {1},
            within=30,
            what="one copy of every key",
        )
        for key, value in values.items():
            assert client.get(key) == value
        # Read through a worker that lacks the key: it asks the AMM and fetches from a peer.
        key = keys[0]
        [holder] = client.who_has([key])[key]
        other = next(w for w in cluster.workers if w != holder)
        assert client.get(key, worker=other) == values[key]
        totals = client.status().totals
        assert totals.directives_applied >= 2 * len(keys)
        assert totals.directives_failed == 0

        # Without the cluster's certificates nobody gets in, by either door.
        with Client(cluster.address, timeout=5) as plaintext:
            with pytest.raises(AmmError) as err:
                plaintext.workers()
            assert err.value.status == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(AmmError) as err:
                plaintext.get(key, worker=holder)
            assert err.value.status == grpc.StatusCode.UNAVAILABLE
        stranger = Security.temporary(tmp_path / "stranger")
        with Client(cluster.address, security=stranger, timeout=5) as other_ca:
            with pytest.raises(AmmError) as err:
                other_ca.workers()
            assert err.value.status == grpc.StatusCode.UNAVAILABLE
        # A reader of this cluster reads, and may not change anything.
        with Client(
            cluster.address, security=cluster.security.as_identity("reader"), timeout=5
        ) as reader:
            assert len(reader.workers()) == 3
            with pytest.raises(AmmError) as err:
                reader.forget(keys)
            assert err.value.status == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(AmmError) as err:
                reader.get(key, worker=holder)
            assert err.value.status == grpc.StatusCode.PERMISSION_DENIED
    assert not cluster.certs.exists(), "the throwaway CA goes with the cluster"


def amm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amm", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_amm_cluster_tls_and_the_cli_with_amm_tls() -> None:
    """``amm cluster --tls`` prints the AMM_TLS to export; CLI verbs and the health probe then
    speak TLS, and without it they cannot talk to the cluster."""
    base = {k: v for k, v in os.environ.items() if k not in TLS_VARIABLES}
    argv = [sys.executable, "-m", "amm", "cluster", "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(
        [*argv, "--workers", "1", "--tls"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=base,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        exports = dict(
            line.split()[1].split("=", 1) for line in lines if line.startswith("export ")
        )
        certs = exports["AMM_TLS"]
        env = {**base, **exports}
        workers = amm("workers", "--json", env=env)
        assert workers.returncode == 0, workers.stderr
        assert '"name": "worker-0"' in workers.stdout
        assert amm("health", env=env).stdout.strip() == "SERVING"
        reader = amm("forget", "x", env={**env, "AMM_IDENTITY": "reader"})
        assert reader.returncode == 1
        assert reader.stderr.startswith("error: PERMISSION_DENIED: ")
        assert "Traceback" not in reader.stderr
        plaintext = amm("workers", env={k: v for k, v in env.items() if k != "AMM_TLS"})
        assert plaintext.returncode == 1
        assert plaintext.stderr.startswith("error: UNAVAILABLE: ")
        assert plaintext.stderr.endswith("(if it serves TLS, set AMM_TLS to its certs folder)\n")
        assert plaintext.stderr.count("\n") == 1, "one line, gRPC's own logs quiet"
        missing = amm("workers", env={**env, "AMM_TLS": certs + "-nowhere"})
        assert (missing.returncode, missing.stderr.count("\n")) == (1, 1)
        assert missing.stderr.startswith("error: ")
        assert "ca.pem does not exist" in missing.stderr
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert not Path(certs).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
