"""A Put of a new key while the AMM restarts: the agent asks the AMM before it stores a key it
lacks (keys are immutable cluster-wide), so for a moment after a restart, while the agent's
channel to the AMM was still backing off, such Puts failed UNAVAILABLE. The agent now waits a
few seconds for the AMM to come back; when it stays away the Put still fails UNAVAILABLE, in
one line that names the AMM."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from amm.client import Client
from amm.cluster import LocalCluster
from amm.errors import AmmError


@pytest.mark.timeout(120)
def test_a_put_right_after_an_amm_restart_succeeds() -> None:
    with LocalCluster(1, interval="200ms", start=True) as cluster:
        worker = cluster.workers[0]
        with Client(cluster.address, timeout=30) as client:
            client.put("before", b"b" * 1000, workers=worker)  # the channel is connected
            for round_ in range(3):
                cluster.restart_service(signal.SIGKILL)
                # At once: the agent may not even have noticed the old AMM is gone.
                client.put(f"after-{round_}", bytes([round_]) * 1000, workers=worker)
                assert client.get(f"after-{round_}", worker) == bytes([round_]) * 1000


@pytest.mark.timeout(120)
def test_a_put_while_the_amm_stays_down_fails_unavailable_naming_the_amm() -> None:
    with LocalCluster(1, interval="200ms", start=True) as cluster:
        worker = cluster.workers[0]
        amm = cluster.address
        with Client(cluster.address, timeout=60) as client:
            client.put("before", b"b" * 1000, workers=worker)
            os.kill(cluster.service_pid, signal.SIGKILL)
            began = time.monotonic()
            with pytest.raises(AmmError) as caught:
                client.put("while-down", b"d" * 1000, workers=worker)
            took = time.monotonic() - began
            # Not a hang until the client's deadline (60 s): the agent gives up after its wait
            # (AMM_RECONNECT_WAIT, 5 s).
            assert took < 30
            err = caught.value
            assert err.status == grpc.StatusCode.UNAVAILABLE
            assert f"cannot ask the AMM at {amm}" in err.message
            assert "\n" not in str(err)
            # A key already held is stored again without asking anyone.
            client.put("before", b"b" * 1000, workers=worker)
