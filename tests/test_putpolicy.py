"""The put-result policy (:func:`dhtsignal.dht.putpolicy.put_result`) on hand-made replies.

Pure: storing nodes' answers in, a :class:`PutResult` or a typed error out; no node, no
clock.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from dhtsignal.dht.putpolicy import STORE_LIMITS, put_result
from dhtsignal.errors import NodeIdTaken, PutFailed, StoreLimitExceeded


def test_all_ok() -> None:
    res = put_result([["ok"], ["ok", "ok"], ["ok"]], 3)
    assert (res.stored, res.refused, res.hops) == (3, {}, 3)


def test_local_copy_counts_and_its_refusals_come_first() -> None:
    own = Counter({"quota": 1})
    res = put_result([["ok"], ["key-full"]], 2, stored=1, refused=own)
    assert res.stored == 2
    assert list(res.refused.items()) == [("quota", 1), ("key-full", 1)]
    assert own == Counter({"quota": 1})  # not modified


def test_some_refuse_for_a_limit_others_store(caplog: pytest.LogCaptureFixture) -> None:
    res = put_result([["ok"], ["quota"], ["ok", "store-full"]], 1)
    assert res.stored == 1
    assert res.refused == {"quota": 1, "store-full": 1}
    assert "others refused (quota=1, store-full=1)" in caplog.text


@pytest.mark.parametrize("limit", sorted(STORE_LIMITS))
def test_every_node_refuses_for_a_limit(limit: str) -> None:
    with pytest.raises(StoreLimitExceeded) as info:
        put_result([[limit], [limit, limit]], 2)
    assert info.value.limit == limit
    assert STORE_LIMITS[limit] in str(info.value)
    assert f"{limit}=3" in str(info.value)


def test_the_limit_named_is_the_most_frequent_first_on_a_tie() -> None:
    with pytest.raises(StoreLimitExceeded) as info:
        put_result([["key-full"], ["quota"], ["quota"], ["bad-sig"]], 1)
    assert info.value.limit == "quota"
    with pytest.raises(StoreLimitExceeded) as info:
        put_result([["key-full"], ["quota"]], 1)
    assert info.value.limit == "key-full"


def test_id_taken_is_decisive_only_from_more_nodes_than_stored() -> None:
    """One storing node's refusal is never decisive (a Sybil node near the key)."""
    assert put_result([["ok"], ["ok"], ["id-taken"]], 1).stored == 2
    assert put_result([["id-taken"]], 1, stored=1).stored == 1  # a tie: kept
    with pytest.raises(NodeIdTaken):
        put_result([["id-taken"], ["id-taken"], ["ok"]], 1)
    with pytest.raises(NodeIdTaken):
        put_result([["quota"]], 1, stored=1, refused=Counter({"id-taken": 2}))
    with pytest.raises(NodeIdTaken):
        put_result([["id-taken"]], 1)


@pytest.mark.parametrize(
    ("replies", "detail"),
    [
        ([None, None], "bad-reply=2"),
        ([b"ok", {"ok": 1}, 7], "bad-reply=3"),
        ([["expired"], ["x" * 40]], f"expired=1, {'x' * 32}=1"),
        ([[1, "ok"]], "1=1"),
        ([], "no storing node found"),
        ([[]], "no storing node found"),
    ],
)
def test_bad_or_other_replies_fail(replies: list[Any], detail: str) -> None:
    with pytest.raises(PutFailed) as info:
        put_result(replies, 1)
    assert type(info.value) is PutFailed
    assert str(info.value) == f"no node stored the record ({detail})"
