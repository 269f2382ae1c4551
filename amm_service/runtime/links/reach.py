"""``Links``: the AMM's ways to its agents, as one collaborator for the parts that poll and
send (the cycles, the worker registry, the queries), rather than three arguments each."""

from __future__ import annotations

from dataclasses import dataclass

from amm_service.runtime.links.agents import AgentLinks
from amm_service.runtime.links.dispatcher import Dispatcher
from amm_service.runtime.links.poller import Poller


@dataclass(frozen=True, slots=True)
class Links:
    """The agent links, one of each: built once by the manager and shared by reference."""

    #: One channel (and stubs) per agent.
    agents: AgentLinks
    #: Reads the agents' inventories into the cluster state.
    poller: Poller
    #: Sends directives on the agents' streams and hands their outcomes back.
    dispatcher: Dispatcher
