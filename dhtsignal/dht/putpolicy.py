"""The put-result policy: what the storing nodes' answers to a put mean, as a pure function.

Theory of operation
-------------------
A put is a storing lookup (``ds_store_find``): every node it asks stores the records as
it answers, with one tag per record, ``"ok"`` or a refusal reason. When the lookup ends,
only the answers of the k closest nodes speak for the put (the others keep spare
copies). :func:`put_result` turns those answers into a :class:`PutResult` or an error:

* a node answering with every tag ``"ok"`` stored the put; any other tag is a refusal,
  counted by reason (cut to 32 characters); an answer that is not a list is counted as
  ``bad-reply``, as is a node that never answered;
* ``id-taken`` (another key holds a live claim on the node ID) is decisive only from
  more storing nodes than stored the put (:class:`~dhtsignal.errors.NodeIdTaken`): one
  storing node's refusal never is (issue 10: a single Sybil node answering ``id-taken``
  must not block an owner's first claim; readers take the claimant most storing nodes
  hold, so a claim stored by most of them is the one that counts);
* no node stored: :class:`~dhtsignal.errors.StoreLimitExceeded` naming the refusal of
  :data:`STORE_LIMITS` given most often (the first such on a tie), else
  :class:`~dhtsignal.errors.PutFailed` listing the refusals;
* some stored and some refused for a limit: a :class:`PutResult`, and a warning logged.

The node's own copy, if it is among the closest, comes in as ``stored`` and
``refused`` already counted (the node stores it itself: that is not pure).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

from dhtsignal.dht.events import PutResult
from dhtsignal.errors import NodeIdTaken, PutFailed, StoreLimitExceeded

log = logging.getLogger(__name__)

#: Refusal reasons of storing nodes that mean "a limit is used up", and what they mean.
STORE_LIMITS = {
    "quota": "the storing nodes' quota for this source host or its prefix (records or bytes, "
    "StorageLimits.max_records_per_source / max_bytes_per_source per host, "
    "max_records_per_prefix / max_bytes_per_prefix per /24 or /48)",
    "key-full": "the values-per-key cap of the storing nodes (StorageLimits.max_values_per_key)",
    "signer-full": "the storing nodes' cap of slots per signer under one key "
    "(StorageLimits.max_slots_per_signer)",
    "store-full": "the storing nodes' total capacity "
    "(StorageLimits.max_keys / max_records / max_bytes)",
}


def put_result(
    replies: Iterable[Any],
    hops: int,
    *,
    stored: int = 0,
    refused: Counter[str] | None = None,
) -> PutResult:
    """The outcome of a put from its storing nodes' answers.

    :param replies: the answer of each storing node among the closest, as decoded (None:
        it never answered).
    :param hops: the storing lookup's hops.
    :param stored: storing nodes that already count as having stored it (our own copy).
    :param refused: refusals already counted, by reason (our own store's); not modified.
    :raises NodeIdTaken: more storing nodes refused with ``id-taken`` than stored.
    :raises StoreLimitExceeded: no node stored, and some refused for a storage limit.
    :raises PutFailed: no node stored, for other reasons.
    """
    refused = Counter() if refused is None else refused.copy()
    for reply in replies:
        if type(reply) is list and reply and all(x == "ok" for x in reply):
            stored += 1
        elif type(reply) is list:
            for x in reply:
                if x != "ok":
                    refused[str(x)[:32]] += 1
        else:
            refused["bad-reply"] += 1
    taken = refused.get("id-taken", 0)
    if taken > stored:
        # Most storing nodes hold another key's live claim: the ID is taken.
        raise NodeIdTaken(
            f"another key holds a live claim on this node id ({taken} storing nodes "
            f"refused id-taken, {stored} stored)"
        )
    if taken:
        log.warning("put: %d storing nodes refused id-taken, %d stored: kept", taken, stored)
    detail = ", ".join(f"{k}={v}" for k, v in refused.items()) or "no storing node found"
    limits = [r for r in refused if r in STORE_LIMITS]
    if stored == 0:
        if limits:
            worst = max(limits, key=refused.__getitem__)
            raise StoreLimitExceeded(
                worst, f"no node stored the record: {STORE_LIMITS[worst]} is used up ({detail})"
            )
        raise PutFailed(f"no node stored the record ({detail})")
    if limits:
        log.warning("put: %d storing nodes stored the record, others refused (%s)", stored, detail)
    return PutResult(stored, dict(refused), hops)
