"""The agent reads a batch of directives as it reads each directive of it alone: the batch path
(``_directives_from_proto``, fields read in one C call per directive) is pinned to
``directive_from_proto``."""

from __future__ import annotations

import asyncio

from amm.v1 import agent_pb2, types_pb2
from worker_agent.servicer import _directives_from_proto, directive_from_proto

DROP, REPLICATE = types_pb2.DIRECTIVE_OP_DROP, types_pb2.DIRECTIVE_OP_REPLICATE


def _variety() -> list[types_pb2.Directive]:
    digest = "ab" * 32
    odd = [
        types_pb2.Directive(
            id="r", epoch=2, op=REPLICATE, key="k", size=5, checksum=digest, sources=["a:1", "b:2"]
        ),
        types_pb2.Directive(id="u", epoch=1, op=99, key="k", holders=["a:1"]),  # type: ignore[arg-type]
        types_pb2.Directive(id="", op=DROP, key="", holders=[]),
        types_pb2.Directive(
            id="n",
            epoch=2**53,
            op=DROP,
            key="é" * 300,
            checksum="X",
            sources=["c:3"],
            holders=["b:2", "a:1", "b:2"],
        ),
        types_pb2.Directive(),
    ]
    usual = [
        types_pb2.Directive(
            id=f"d{i}",
            epoch=3,
            op=DROP,
            key=f"key-{i}",
            size=i,
            checksum=digest,
            holders=[f"h:{i % 3 + 1}"],
            policy="p",
        )
        for i in range(300)
    ]
    return [*usual[:100], *odd, *usual[100:]]


def test_a_batch_is_read_as_each_of_its_directives_alone() -> None:
    batch = agent_pb2.DirectivesRequest.FromString(
        agent_pb2.DirectivesRequest(batch=_variety()).SerializeToString()
    ).batch
    read = asyncio.run(_directives_from_proto(batch))
    assert read == [directive_from_proto(message) for message in batch]
    # Directives naming the same holders share one tuple of them.
    holders = {d.holders for d in read if d.id.startswith("d")}
    assert len(holders) == 3
    by_value = {h: h for h in holders}
    assert all(d.holders is by_value[d.holders] for d in read if d.id.startswith("d"))
