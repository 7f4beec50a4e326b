"""Protocol parameters of a DHT node, with the source of each default."""

from __future__ import annotations

from dataclasses import dataclass, field

from dhtsignal.dht.records import DEFAULT_NETWORK as DEFAULT_NETWORK
from dhtsignal.dht.storage import StorageLimits


@dataclass(frozen=True)
class NodeConfig:
    """How one DHT node behaves. Timeouts and retries live here, not in module globals."""

    network: str = DEFAULT_NETWORK
    """Network id carried by our RPCs and signed into every record (at most 64 bytes);
    nodes and records of another network are ignored."""
    ksize: int = 20
    """Bucket size k and lookup result size (Kademlia paper section 2.2)."""
    alpha: int = 3
    """Lookup parallelism (paper section 2.3)."""
    replicas: int = 8
    """Storing nodes per key (OpenDHT's default)."""
    rpc_timeout: float = 0.4
    """Seconds before one try of an RPC is retried."""
    rpc_retries: int = 2
    """Tries of an RPC after the first (rpcudp makes one try and waits 5 s)."""
    peer_timeout: float = 0.3
    """Soft per-peer timeout of a lookup: a peer slower than this stops holding a
    parallelism slot and the lookup no longer waits for it."""
    adaptive_timeouts: bool = True
    """Shorten the soft per-peer timeout to what this node's answers take: the smoothed
    round-trip time plus four deviations (RFC 6298), between ``min_peer_timeout`` and
    ``peer_timeout``; a strict lookup then waits three times that, up to
    ``strict_wait``. A dead contact then costs a lookup about one round trip's worth,
    not ``peer_timeout``."""
    min_peer_timeout: float = 0.02
    """Floor of the adaptive soft timeout, seconds (scheduling jitter on a busy host)."""
    max_failures: int = 3
    """Consecutive failed RPCs before a contact is evicted (one lost reply never evicts)."""
    replacements: int = 5
    """Contacts kept per bucket in its replacement cache (paper section 4.1; the stock
    table keeps 5k, most of an idle node's memory)."""
    refresh_interval: float = 900.0
    """Seconds after which a bucket with no contact seen is refreshed by a lookup."""
    maintenance_interval: float = 10.0
    """Seconds between maintenance rounds (expiry, bucket refresh)."""
    listen_ttl: float = 60.0
    """Subscription lifetime a listener asks for; it refreshes at half of it."""
    poll_interval: float = 5.0
    """Fallback polling period of ``listen`` when no storing node accepts a subscription."""
    lookup_cache_ttl: float = 30.0
    """Seconds a key's closest nodes are remembered to start the next lookup from."""
    rate_per_source: float = 1000.0
    """Requests per second accepted from one source host, an IPv4 address or IPv6 /64,
    whatever its ports (0 disables)."""
    rate_burst: float = 2000.0
    """Token-bucket burst for the per-host rate."""
    rate_per_prefix: float = 4000.0
    """Requests per second accepted from one source prefix, an IPv4 /24 or IPv6 /48
    (0 disables)."""
    rate_prefix_burst: float = 8000.0
    """Token-bucket burst for the per-prefix rate."""
    max_inflight: int = 4096
    """Outstanding RPCs this node may have."""
    inflight_reserve: int = 512
    """Of ``max_inflight``, the RPCs kept for bucket-head pings and pushes to listeners:
    lookups, puts and subscriptions stop short of them, so a full table still pings and
    pushes (issue 10, fairness when full)."""
    max_pushes: int = 1024
    """Pushes (``ds_notify``) awaiting an answer, in total."""
    max_pushes_per_host: int = 16
    """Pushes awaiting an answer from one listener host (IPv4 address, IPv6 /64)."""
    max_pushes_per_prefix: int = 64
    """Pushes awaiting an answer from one listener prefix (IPv4 /24, IPv6 /48)."""
    client_mode: bool = False
    """Behind NAT: never enter others' routing tables, never store for others."""
    accept_stock: bool = True
    """Answer the stock kademlia RPCs (ping, find_node, find_value, store)."""
    max_per_prefix: int = 1
    """Contacts of one prefix (IPv4 /24, IPv6 /48) among a lookup's closest (0: no
    limit); only public addresses count unless ``diversity_on_private`` (issue 10)."""
    diversity_on_private: bool = False
    """Apply ``max_per_prefix`` to private and loopback addresses too (the switch for
    tests and the simulator)."""
    name_replicas: int = 33
    """Storing nodes of a node ID's claim and presence (``node_key``), and nodes a name is
    read from: with one place per prefix among them, an attacker needs more than 16
    /24 prefixes to outnumber the honest storing nodes (``bench/sybil.py``)."""
    max_rate_entries: int = 10_000
    """Hosts (and prefixes) the rate limiter tracks at most (the oldest entry goes first)."""
    max_pages: int = 16
    """``ds_find_value`` pages fetched per answering node and page chains per lookup."""
    listen_queue_size: int = 256
    """Pushed records a ``listen`` iterator holds unread before it drops new ones."""
    lookup_cache_size: int = 512
    """Keys whose closest nodes are remembered (see ``lookup_cache_ttl``)."""
    max_refresh_lookups: int = 64
    """Operations in progress beyond which maintenance starts no bucket refresh."""
    good_for: float = 900.0
    """Seconds a contact stays *good* after we last heard from it (BEP 5's 15 minutes).
    Find replies (ours and the stock ``find_node``/``find_value``) name only good
    contacts; an older one is *questionable* and is pinged before it is handed out again."""
    liveness_interval: float = 1.0
    """Seconds between rounds of liveness pings of questionable contacts."""
    liveness_pings: int = 8
    """Liveness pings started per round at most (questionable contacts wait their turn)."""
    max_suspects: int = 256
    """Questionable contacts queued for a liveness ping at most (the oldest go first)."""
    recent_failure_ttl: float = 30.0
    """Seconds a contact whose lookup query just passed the soft timeout (or whose first
    try went unanswered) is not asked again by other lookups, unless it answers meanwhile."""
    recent_failures_size: int = 1024
    """Contacts remembered as recently failed at most (the oldest entry goes first)."""
    strict_wait: float = 0.5
    """Seconds a put/get lookup keeps waiting for a slow contact among the k closest
    (past ``peer_timeout`` it no longer holds a parallelism slot, but the lookup only
    ends once the k closest have answered or failed, or this passed): two nodes then
    agree on where a key lives."""
    get_ends_at_quorum: bool = True
    """A get of ``replicas`` storing nodes ends as soon as half of them answered with
    records, instead of also waiting for the rest of the k closest: under churn one of
    those is often dead, and each dead one cost a soft timeout. Reads of a node ID's
    claim and presence (``name_replicas`` storing nodes, support counted) never end
    early."""
    join_refreshes: int = 0
    """Full bucket refreshes after a join's self-lookup at most (0: none; the paper's
    section 2.3 refreshes every bucket farther than our closest neighbour): a lookup of
    a random ID at each distance from the farthest half of the ID space down to our
    closest neighbour's. Off by default: in a simulated mass join of 1,000 nodes they
    sent 470k datagrams (20x the puts that followed) and fixed nothing the small fills
    (``join_fill_below``) do not; with real processes that burst was the load that made
    puts and gets time out. Buckets still refresh after ``refresh_interval``."""
    join_fill_below: int = 2
    """Shortly after a join's self-lookup (see ``join_fill_delay``), a distance (from the
    farthest half of the ID space down to our closest neighbour's) at which the table
    knows fewer contacts than this gets one small lookup (0: none). In a mass join a
    newcomer's self-lookup stays inside its own subtree, and without these a put from
    its neighbourhood can end there, far from the key (:mod:`~dhtsignal.dht.join`)."""
    join_fill_delay: float = 1.0
    """Seconds after the self-lookup by which those lookups start (at a random moment in
    the second half): in a mass join the nodes joining together are known by then, and
    the fills do not add to the burst of self-lookups at the bootstrap node."""
    join_fill_k: int = 4
    """Result size of those lookups: they only need a few live contacts at each
    distance, and a small one costs a fraction of a full bucket refresh."""
    join_refresh_delay: float = 30.0
    """Seconds after a join's self-lookup by which its bucket refreshes start (at a
    random moment in the second half of it)."""
    rejoin_delay: float = 1.0
    """Seconds before a join that ended with an empty routing table (no bootstrap
    address answered), or a table found empty later, is tried again through the same
    addresses (0: never, and a lookup on an empty table does not join first either);
    doubled after each try that finds nobody, up to
    ``rejoin_max``, each at a random moment in the second half of the wait. When a
    thousand nodes join at once, the bootstrap node's socket drops what it cannot
    queue; those joiners come back spread out instead of staying alone."""
    rejoin_max: float = 60.0
    """Longest wait between two such tries, seconds."""
    join_first_wait: float = 5.0
    """Seconds a lookup (put, get, listen) started on an empty table keeps joining again
    (a try every 0.25-0.5 s after the last failed) before it runs on what it has: a
    node that lost its contacts answers from the network once a bootstrap node does."""
    leave_notices: int = 256
    """``ds_leave`` datagrams a node sends when it stops (its closest contacts first)."""
    leave_confirm_retries: int = 1
    """Retries of the ping that confirms a ``ds_leave`` before the contact is evicted
    (a notice is only a hint: a node that still answers stays)."""
    amplification_factor: float = 3.0
    """Bytes sent per byte received from an address not yet validated (RFC 9000
    section 8's anti-amplification limit): replies are cut to fit, or not sent."""
    validated_size: int = 16384
    """Validated addresses remembered at most (least recently used first out); an
    address forgotten is validated again by a ping when it next asks."""
    unvalidated_size: int = 16384
    """Byte accounts of addresses not yet validated kept at most (oldest first out)."""
    validation_pings: float = 1000.0
    """Pings per second at most to validate new senders (and admit them as contacts)."""
    limits: StorageLimits = field(default_factory=StorageLimits)
    """Bounds on what others can make this node store."""
