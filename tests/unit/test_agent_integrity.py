"""The agent's integrity rules, judged on real stores with no I/O."""

from __future__ import annotations

from amm.base.checksum import checksum
from worker_agent import integrity
from worker_agent.integrity import Accept, Conditions, Directive, Op, Reason, Refuse
from worker_agent.store import Key, Store

K = Key("k")
DATA = b"value"
SUM = checksum(DATA)
NOW = 100.0


def held(data: bytes = DATA) -> Store:
    store = Store()
    store.add(K, data, checksum(data))
    return store


def drop(**kwargs: object) -> Directive:
    values: dict[str, object] = {
        "id": "d1",
        "epoch": 3,
        "op": Op.DROP,
        "key": K,
        "checksum": SUM,
        "holders": ("peer:1",),
    }
    values.update(kwargs)
    return Directive(**values)  # type: ignore[arg-type]


def replicate(**kwargs: object) -> Directive:
    values: dict[str, object] = {
        "id": "r1",
        "epoch": 3,
        "op": Op.REPLICATE,
        "key": K,
        "size": len(DATA),
        "checksum": SUM,
        "sources": ("peer:1",),
    }
    values.update(kwargs)
    return Directive(**values)  # type: ignore[arg-type]


def reason(verdict: integrity.Verdict) -> Reason | None:
    return verdict.reason if isinstance(verdict, Refuse) else None


def test_stale_epoch_is_refused_before_anything_else() -> None:
    verdict = integrity.judge(held(), drop(epoch=2), Conditions(newest_epoch=3), NOW)
    assert reason(verdict) is Reason.STALE_EPOCH
    assert integrity.judge(held(), drop(epoch=3), Conditions(newest_epoch=3), NOW) == Accept()


def test_malformed_directives_are_invalid() -> None:
    assert reason(integrity.judge(held(), drop(key=Key("")), Conditions(), NOW)) is Reason.INVALID
    assert reason(integrity.judge(held(), drop(id=""), Conditions(), NOW)) is Reason.INVALID
    unknown = drop(op=Op.UNSPECIFIED)
    assert reason(integrity.judge(held(), unknown, Conditions(), NOW)) is Reason.INVALID


def test_drop_protects_pinned_read_promised_and_dropping_keys() -> None:
    cases = {}
    store = held()
    store.pin(K)
    cases[Reason.PINNED] = store
    store = held()
    store.begin_use(K)
    cases[Reason.IN_USE] = store
    store = held()
    store.promise(K, until=NOW + 1)
    cases[Reason.KEEP_PROMISED] = store
    store = held()
    store.mark_dropping(K)
    cases[Reason.DROPPING] = store
    for expected, store in cases.items():
        assert reason(integrity.judge_drop(store, drop(), Conditions(), NOW)) is expected


def test_drop_after_the_lease_expired_is_accepted() -> None:
    store = held()
    store.promise(K, until=NOW)
    assert integrity.judge_drop(store, drop(), Conditions(), NOW) == Accept()


def test_drop_needs_a_holder_matching_content_and_a_running_agent() -> None:
    store = held()
    no_holders = integrity.judge(store, drop(holders=()), Conditions(), NOW)
    assert reason(no_holders) is Reason.INVALID, "malformed, as amm.v1.RefusalReason says"
    other = integrity.judge_drop(store, drop(checksum=checksum(b"other")), Conditions(), NOW)
    assert reason(other) is Reason.NOT_HELD
    closing = integrity.judge_drop(store, drop(), Conditions(closing=True), NOW)
    assert reason(closing) is Reason.CLOSING
    assert integrity.judge_drop(store, drop(checksum=""), Conditions(), NOW) == Accept()


def test_drop_of_a_key_not_held_is_an_idempotent_noop() -> None:
    assert integrity.judge_drop(Store(), drop(), Conditions(), NOW) == Accept(True, "not held")


def test_drop_commit_rechecks_what_may_have_appeared_meanwhile() -> None:
    store = held()
    store.mark_dropping(K)
    assert integrity.judge_drop_commit(store, K, SUM, NOW) == Accept()
    store.pin(K)
    assert reason(integrity.judge_drop_commit(store, K, SUM, NOW)) is Reason.PINNED
    store.unpin(K)
    store.begin_use(K)
    assert reason(integrity.judge_drop_commit(store, K, SUM, NOW)) is Reason.IN_USE


def test_replicate_rules() -> None:
    cond = Conditions()
    assert integrity.judge_replicate(Store(), replicate(), cond) == Accept()
    assert integrity.judge_replicate(held(), replicate(), cond).noop  # type: ignore[union-attr]
    other = held(b"other")
    assert reason(integrity.judge_replicate(other, replicate(), cond)) is Reason.INVALID
    paused = integrity.judge_replicate(Store(), replicate(), Conditions(paused=True))
    assert reason(paused) is Reason.PAUSED
    closing = integrity.judge_replicate(Store(), replicate(), Conditions(closing=True))
    assert reason(closing) is Reason.CLOSING
    no_source = integrity.judge(Store(), replicate(sources=()), cond, NOW)
    assert reason(no_source) is Reason.INVALID


def test_a_replicate_without_a_well_formed_checksum_is_invalid() -> None:
    """Nothing could verify the data or its size: the memory limit would be judged on a size
    the source never has to match."""
    for bad in ("", SUM.upper(), SUM[:-1], SUM[:-1] + "g"):
        assert reason(integrity.judge(Store(), replicate(checksum=bad), Conditions(), NOW)) is (
            Reason.INVALID
        ), bad
    assert integrity.validate(replicate()) is None
    assert integrity.validate(drop(checksum="")) is None, "a DROP's checksum is optional"
    assert reason(integrity.validate(drop(checksum="xyz"))) is Reason.INVALID  # type: ignore[arg-type]


def test_replicate_respects_the_memory_limit() -> None:
    store = Store()
    store.add(Key("other"), b"x" * 6, checksum(b"x" * 6))
    limit = Conditions(memory_limit=10)
    too_much = integrity.judge_replicate(store, replicate(size=5), limit)
    assert reason(too_much) is Reason.MEMORY_LIMIT
    assert integrity.judge_replicate(store, replicate(size=4), limit) == Accept()
    received = integrity.judge_replicate(store, replicate(size=4), limit, received=5)
    assert reason(received) is Reason.MEMORY_LIMIT, "judged on what arrived too"


def test_keep_promise_is_refused_while_dropping_or_without_a_matching_copy() -> None:
    cond = Conditions()
    assert integrity.judge_keep(held(), K, SUM, cond) == Accept()
    assert integrity.judge_keep(held(), K, "", cond) == Accept()
    assert reason(integrity.judge_keep(Store(), K, SUM, cond)) is Reason.NOT_HELD
    assert reason(integrity.judge_keep(held(b"other"), K, SUM, cond)) is Reason.NOT_HELD
    store = held()
    store.mark_dropping(K)
    assert reason(integrity.judge_keep(store, K, SUM, cond)) is Reason.DROPPING
    closing = integrity.judge_keep(held(), K, SUM, Conditions(closing=True))
    assert reason(closing) is Reason.CLOSING


def test_concurrent_drops_of_the_last_two_replicas_cannot_both_pass() -> None:
    """Each agent marks its drop before asking the other, so each refuses the other's ask."""
    a, b = held(), held()
    for store in (a, b):
        assert integrity.judge_drop(store, drop(), Conditions(), NOW) == Accept()
        store.mark_dropping(K)
    assert reason(integrity.judge_keep(b, K, SUM, Conditions())) is Reason.DROPPING
    assert reason(integrity.judge_keep(a, K, SUM, Conditions())) is Reason.DROPPING


def test_a_promise_given_blocks_the_own_drop_and_delete() -> None:
    store = held()
    assert integrity.judge_keep(store, K, SUM, Conditions()) == Accept()
    store.promise(K, until=NOW + 10)
    assert reason(integrity.judge_drop(store, drop(), Conditions(), NOW)) is Reason.KEEP_PROMISED
    assert reason(integrity.judge_delete(store, K, NOW)) is Reason.KEEP_PROMISED


def test_delete_and_put_rules() -> None:
    assert integrity.judge_delete(Store(), K, NOW) == Accept(True, "not held")
    store = held()
    store.pin(K)
    assert reason(integrity.judge_delete(store, K, NOW)) is Reason.PINNED
    cond = Conditions(memory_limit=8, max_value_bytes=6)
    assert reason(integrity.judge_put(Store(), K, 7, cond)) is Reason.MEMORY_LIMIT
    assert integrity.judge_put(held(), K, 5, cond).noop  # type: ignore[union-attr]
    full = held()
    assert reason(integrity.judge_put(full, Key("new"), 4, cond)) is Reason.MEMORY_LIMIT
    assert integrity.judge_put(full, Key("new"), 3, cond) == Accept()


def test_forget_is_held_back_by_pins_only() -> None:
    """Readers stream their own immutable bytes; a stalled one must not keep a forgotten key."""
    store = held()
    store.begin_use(K)
    store.promise(K, until=NOW + 10)
    assert reason(integrity.judge_delete(store, K, NOW)) is Reason.IN_USE
    assert integrity.judge_delete(store, K, NOW, forget=True) == Accept()
    store.pin(K)
    assert reason(integrity.judge_delete(store, K, NOW, forget=True)) is Reason.PINNED


def test_a_checksum_is_64_lowercase_hexadecimal_digits_and_nothing_else() -> None:
    digest = checksum(b"x")
    assert integrity.is_checksum(digest)
    for wrong in (
        digest.upper(),
        digest[:-1],
        digest + "0",
        digest[:-1] + "g",
        digest[:-1] + "\n",
        " " + digest[1:],
        "",
        "\u0663" * 64,  # a digit, but not an ASCII one
    ):
        assert not integrity.is_checksum(wrong), wrong


def test_all_checksums_judges_a_batch_as_is_checksum_judges_each() -> None:
    """The batch check (one C-level pass over thousands) is pinned to the check of one: a
    single bad text anywhere in a batch, in any position of the text, fails the batch."""
    good = [checksum(str(i).encode()) for i in range(200)]
    assert integrity.all_checksums(good)
    assert integrity.all_checksums([])
    odd = "0123456789abcdefABCDEFgz \n\t\u0663\u00e9\udc80\x00-"
    for position in (0, 1, 31, 63):
        for char in odd:
            text = good[7][:position] + char + good[7][position + 1 :]
            for batch in ([text], [*good[:50], text, *good[50:]]):
                expected = all(map(integrity.is_checksum, batch))
                assert integrity.all_checksums(batch) is expected, (position, char)
            assert integrity.is_checksum(text) is (char in "0123456789abcdef")
    for wrong in ("", good[0][:-1], good[0] + "0", good[0][:32] + good[0]):
        assert not integrity.all_checksums([*good[:3], wrong])


def _drop_cases() -> list[tuple[Directive, Conditions]]:
    """Drops valid and not, current and not: each way ``validate`` or ``judge_epoch`` refuses."""
    long_ascii, long_utf8 = Key("k" * 1024), Key("é" * 300)
    variants: list[dict[str, object]] = [
        {},
        {"id": ""},
        {"key": Key("")},
        {"key": long_ascii},
        {"key": Key("k" * 1025)},
        {"key": long_utf8},
        {"key": Key("é" * 600)},
        {"epoch": -1},
        {"epoch": 2**53},
        {"epoch": 2},
        {"epoch": 4},
        {"op": Op.UNSPECIFIED},
        {"op": Op.REPLICATE},
        {"holders": ()},
        {"holders": ("not an address",)},
        {"holders": ("peer:1", "peer:0")},
        {"holders": ("peer:1", "peer:2")},
        {"sources": ("peer:2",)},
        {"sources": ("bad",)},
        {"checksum": ""},
        {"checksum": SUM.upper()},
        {"checksum": "0" * 64},
        {"checksum": SUM[:-1]},
    ]
    conditions = [
        Conditions(newest_epoch=3),
        Conditions(newest_epoch=3, confirms_epochs=True),
        Conditions(newest_epoch=2, confirms_epochs=True),
        Conditions(newest_epoch=2),
        Conditions(newest_epoch=5),
    ]
    return [(drop(**variant), cond) for variant in variants for cond in conditions]


def test_current_drop_is_validate_and_judge_epoch_for_every_kind_of_drop() -> None:
    """The batch's quick judgement of a drop's form and epoch lets through exactly what the two
    rules do, with or without the store's checksum (taken as well formed when it is held)."""
    stores: list[Store | None] = [None, held(), Store()]
    for directive, cond in _drop_cases():
        expected = (
            integrity.validate(directive) is None and integrity.judge_epoch(directive, cond) is None
        )
        for store in stores:
            peers_checked: dict[tuple[str, ...], bool] = {}
            for _ in range(2):  # the second time with the holders' verdict remembered
                values = None if store is None else store.held
                assert integrity.current_drop(directive, cond, peers_checked, values) is expected, (
                    directive,
                    cond,
                )


def test_current_drops_lets_a_part_through_only_when_each_drop_would_pass() -> None:
    """The bulk judgement of a part of a batch (``current_drops``) says yes only when
    ``current_drop`` says yes to each drop of it, and says yes to the usual part; any drop it
    cannot judge so cheaply sends the part to be judged drop by drop."""
    usual = [drop(id=f"usual-{i}", key=Key(f"k{i}")) for i in range(3)]
    for directive, cond in _drop_cases():
        for part in ([directive], [*usual, directive], [directive, *usual]):
            each = all(integrity.current_drop(d, cond, {}) for d in part)
            peers_checked: dict[tuple[str, ...], bool] = {}
            for _ in range(2):  # the second time with the holders' verdict remembered
                bulk = integrity.current_drops(part, cond, peers_checked)
                assert not bulk or each, (directive, cond)
        if directive == drop() and integrity.current_drop(directive, cond, {}):
            assert integrity.current_drops([*usual, directive], cond, {}), cond
    assert integrity.current_drops([], Conditions(), {})
