"""Settings of the ``dhtsignal`` commands, from flags, environment, a TOML file and defaults.

Theory of operation
-------------------
:class:`Settings` is the single declaration of every setting. Each field carries
a :class:`Spec` in its metadata (made by :func:`spec`): how the value is
written and checked (a :class:`ValueType`), the ``--help`` line, the commands that
read it, and where it sits in a TOML file. Everything else is derived from that
table, with no per-setting code:

* the flag ``--presence-ttl`` (:func:`add_arguments` registers it with argparse,
  which only collects strings; parsing happens here so errors name the setting),
* the environment variable ``DHTSIGNAL_PRESENCE_TTL`` (lists comma-separated),
* the TOML key ``presence_ttl`` (storage limits live in a ``[storage]`` table).

:func:`load` merges, for one command, in increasing precedence: the default
(static, or computed per command), the TOML file's top level, the TOML file's
table named after the command (``[peer]``, ``[lookup]``...), the environment,
and the flags. A TOML file may hold settings of other commands (they are
checked, then ignored), so one file can serve a daemon and the query commands;
the environment is read only for the settings of the running command. Any bad
value, even one that a source of higher precedence overrides, raises
:class:`~dhtsignal.errors.ConfigError` naming the setting as the user wrote it
(``--presence-ttl``, ``DHTSIGNAL_PRESENCE_TTL`` or ``presence_ttl`` in the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import math
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dhtsignal.commands import ALL, CLIENTS, DAEMONS, DIALERS, NODES, PINNING, SESSIONS
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.records import MAX_TTL, RecordType, check_label
from dhtsignal.dht.storage import StorageLimits
from dhtsignal.errors import ConfigError
from dhtsignal.wire.addr import Addr, parse_addr, show_addr

ENV_PREFIX = "DHTSIGNAL_"
#: The word that turns an optional file setting off (``--known-peers none``).
NONE_WORD = "none"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DEFAULT_ROOM = "lobby"
BOOTSTRAP_PORT = 4000

_NODE = NodeConfig()
_LIMITS = StorageLimits()


# -- types of values ----------------------------------------------------------------------


@dataclass(frozen=True)
class ValueType:
    """How the values of a setting are written and checked.

    Both parsers raise ValueError with a message that does not repeat the setting's name.
    """

    metavar: str
    """Placeholder in ``--help``, e.g. ``HOST:PORT``."""
    from_text: Callable[[str], Any]
    """Parse a flag or environment value."""
    from_toml: Callable[[object], Any]
    """Check and convert a value read from TOML."""
    show: Callable[[Any], str] = str
    """Render a value (defaults in ``--help``)."""
    is_list: bool = False
    """Repeatable flag; comma-separated in the environment; an array in TOML."""
    is_bool: bool = False
    """``--x`` / ``--no-x`` flag; ``true``/``false`` in the environment."""
    to_toml: Callable[[Any], str] = json.dumps
    """Render a value as a TOML literal (``--print-config``)."""
    nullable: bool = False
    """None is a value that can be written (``none``), not just "unset"."""


def _expect(value: object, types: tuple[type, ...], what: str) -> None:
    """Raise ValueError unless ``value`` is of ``types`` (TOML booleans are not numbers)."""
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ValueError(f"expected {what}, got {type(value).__name__} {value!r}")


def text(check: Callable[[str], str] | None = None, metavar: str = "TEXT") -> ValueType:
    """A string, optionally checked by ``check`` (which raises ValueError)."""

    def parse(s: str) -> str:
        if not s:
            raise ValueError("must not be empty")
        return check(s) if check is not None else s

    def from_toml(v: object) -> str:
        _expect(v, (str,), "a string")
        assert isinstance(v, str)
        return parse(v)

    return ValueType(metavar, parse, from_toml)


def choice(options: Sequence[str]) -> ValueType:
    """One of ``options`` (case-insensitive)."""

    def check(s: str) -> str:
        if s.lower() not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {s!r}")
        return s.lower()

    return text(check, metavar="{" + ",".join(options) + "}")


def _bounded(lo: float | None, hi: float | None, lo_open: bool) -> Callable[[float], None]:
    def check(x: float) -> None:
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError(f"must be a finite number, got {x}")
        if lo is not None and (x <= lo if lo_open else x < lo):
            raise ValueError(f"must be {'>' if lo_open else '>='} {lo:g}, got {x:g}")
        if hi is not None and x > hi:
            raise ValueError(f"must be <= {hi:g}, got {x:g}")

    return check


def integer(lo: int | None = 0, hi: int | None = None) -> ValueType:
    """A whole number in ``[lo, hi]``."""
    check = _bounded(lo, hi, lo_open=False)

    def from_text(s: str) -> int:
        try:
            x = int(s.strip())
        except ValueError:
            raise ValueError(f"expected a whole number, got {s!r}") from None
        check(x)
        return x

    def from_toml(v: object) -> int:
        _expect(v, (int,), "a whole number")
        assert isinstance(v, int)
        check(v)
        return v

    return ValueType("N", from_text, from_toml, to_toml=str)


def number(
    lo: float | None = 0.0,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    metavar: str = "SECONDS",
) -> ValueType:
    """A real number (seconds, rates) in ``[lo, hi]`` (``(lo, hi]`` if ``lo_open``)."""
    check = _bounded(lo, hi, lo_open)

    def from_text(s: str) -> float:
        try:
            x = float(s.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {s!r}") from None
        check(x)
        return x

    def from_toml(v: object) -> float:
        _expect(v, (int, float), "a number")
        assert isinstance(v, int | float)
        check(float(v))
        return float(v)

    return ValueType(metavar, from_text, from_toml, show=lambda x: f"{x:g}", to_toml=repr)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def boolean() -> ValueType:
    """A switch: ``--x``/``--no-x``; ``true``/``false`` (or 1/0, yes/no, on/off) elsewhere."""

    def from_text(s: str) -> bool:
        if s.strip().lower() in _TRUE:
            return True
        if s.strip().lower() in _FALSE:
            return False
        raise ValueError(f"expected true or false, got {s!r}")

    def from_toml(v: object) -> bool:
        _expect(v, (bool,), "true or false")
        return bool(v)

    def show(b: bool) -> str:
        return "true" if b else "false"

    return ValueType("BOOL", from_text, from_toml, show=show, is_bool=True, to_toml=show)


def address() -> ValueType:
    """A UDP address ``HOST:PORT`` (``[V6]:PORT`` for IPv6); HOST may be a name."""

    def from_text(s: str) -> Addr:
        try:
            return parse_addr(s)
        except ValueError as exc:
            msg = str(exc)
            if "invalid literal" in msg:
                msg = f"{s!r} is not HOST:PORT (the port must be a number)"
            raise ValueError(msg) from None

    def from_toml(v: object) -> Addr:
        _expect(v, (str,), "a string 'HOST:PORT'")
        assert isinstance(v, str)
        return from_text(v)

    def to_toml(a: Addr) -> str:
        return json.dumps(show_addr(a))

    return ValueType("HOST:PORT", from_text, from_toml, show=show_addr, to_toml=to_toml)


def path(*, optional: bool = False) -> ValueType:
    """A file system path (``~`` expanded); with ``optional``, the word ``none`` is None."""

    def from_text(s: str) -> Path | None:
        if optional and s.strip().lower() == NONE_WORD:
            return None
        if not s:
            raise ValueError("must not be empty")
        return Path(s).expanduser()

    def from_toml(v: object) -> Path | None:
        _expect(v, (str,), "a string (a path)")
        assert isinstance(v, str)
        return from_text(v)

    def show(p: Path | None) -> str:
        return NONE_WORD if p is None else str(p)

    return ValueType(
        "PATH",
        from_text,
        from_toml,
        show=show,
        to_toml=lambda p: json.dumps(show(p)),
        nullable=optional,
    )


def listof(item: ValueType) -> ValueType:
    """Several values of ``item``: a repeatable flag, comma-separated text, a TOML array."""

    def from_text(s: str) -> tuple[Any, ...]:
        return tuple(item.from_text(part.strip()) for part in s.split(",") if part.strip())

    def from_toml(v: object) -> tuple[Any, ...]:
        _expect(v, (list,), "an array")
        assert isinstance(v, list)
        return tuple(item.from_toml(x) for x in v)

    def show(values: tuple[Any, ...]) -> str:
        return ",".join(item.show(x) for x in values) or "none"

    def to_toml(values: tuple[Any, ...]) -> str:
        return "[" + ", ".join(item.to_toml(x) for x in values) + "]"

    return ValueType(item.metavar, from_text, from_toml, show=show, is_list=True, to_toml=to_toml)


def address_list() -> ValueType:
    """Several ``HOST:PORT`` addresses; an item ``@FILE`` reads a nodes file.

    A nodes file (``bootstrap/nodes.txt``) holds one ``HOST:PORT`` per line; ``#``
    starts a comment.
    """
    one = address()

    def item(s: str) -> tuple[Addr, ...]:
        if not s.startswith("@"):
            return (one.from_text(s),)
        file = Path(s[1:]).expanduser()
        try:
            lines = file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read nodes file {file}: {exc}") from None
        out: list[Addr] = []
        for n, line in enumerate(lines, 1):
            entry = line.split("#", 1)[0].strip()
            if entry:
                try:
                    out.append(one.from_text(entry))
                except ValueError as exc:
                    raise ValueError(f"{file}:{n}: {exc}") from None
        if not out:
            raise ValueError(f"nodes file {file} lists no address")
        return tuple(out)

    def from_text(s: str) -> tuple[Addr, ...]:
        return tuple(a for part in s.split(",") if part.strip() for a in item(part.strip()))

    def from_toml(v: object) -> tuple[Addr, ...]:
        _expect(v, (list,), "an array of 'HOST:PORT' strings")
        assert isinstance(v, list)
        out: list[Addr] = []
        for x in v:
            _expect(x, (str,), "a string 'HOST:PORT' or '@FILE'")
            assert isinstance(x, str)
            out.extend(item(x.strip()))
        return tuple(out)

    def show(values: tuple[Addr, ...]) -> str:
        return ",".join(show_addr(a) for a in values) or "none"

    def to_toml(values: tuple[Addr, ...]) -> str:
        return "[" + ", ".join(json.dumps(show_addr(a)) for a in values) + "]"

    return ValueType(
        "HOST:PORT|@FILE", from_text, from_toml, show=show, is_list=True, to_toml=to_toml
    )


def _label(what: str) -> Callable[[str], str]:
    def check(s: str) -> str:
        return check_label(s, what)

    return check


def _ip(s: str) -> str:
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        raise ValueError(f"{s!r} is not an IP address") from None


def _ice_url(s: str) -> str:
    if not s.startswith(("stun:", "turn:", "turns:")):
        raise ValueError(f"{s!r} is not a stun:, turn: or turns: URL")
    return s


def _network(s: str) -> str:
    if len(s.encode()) > 64:
        raise ValueError("at most 64 bytes")
    return s


# -- the table ----------------------------------------------------------------------------

DefaultFactory = Callable[[str, Mapping[str, str]], Any]


@dataclass(frozen=True)
class Spec:
    """Everything the loader needs to know about one setting (see :func:`spec`)."""

    vtype: ValueType
    """How values are written and checked."""
    help: str
    """One line for ``--help``."""
    commands: frozenset[str]
    """The commands that read it."""
    toml: tuple[str, ...] | None
    """Path of the key in a TOML file (``()`` means the field name); None: not in TOML."""
    per_command: DefaultFactory | None
    """Computes the default for a command (from the environment), overriding the static one."""
    default_help: str | None
    """How ``--help`` describes a computed default."""
    required: bool
    """The commands that read it cannot run without a value."""


def spec(
    vtype: ValueType,
    help: str,
    commands: frozenset[str] = ALL,
    *,
    toml: tuple[str, ...] | None = (),
    per_command: DefaultFactory | None = None,
    default_help: str | None = None,
    required: bool = False,
) -> dict[str, Spec]:
    """The metadata declaring one field of :class:`Settings` as a setting.

    Used as ``field(default=..., metadata=spec(vtype, help, ...))``; the field's default is
    the value when nothing sets it (and for the commands that do not read it).

    :param vtype: how values are written and checked.
    :param help: one line for ``--help``.
    :param commands: the commands that read it.
    :param toml: path of the key in a TOML file; ``()`` is the field name; None: not in TOML.
    :param per_command: computes a command's default from ``(command, environ)``.
    :param default_help: how ``--help`` shows a computed default.
    :param required: the commands that read it need a non-empty value.
    """
    return {"spec": Spec(vtype, help, commands, toml, per_command, default_help, required)}


def data_home(environ: Mapping[str, str]) -> Path:
    """``$XDG_DATA_HOME/dhtsignal`` (``~/.local/share/dhtsignal`` when unset)."""
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "dhtsignal"


def _default_listen(command: str, environ: Mapping[str, str]) -> Addr:
    return ("0.0.0.0", BOOTSTRAP_PORT if command == "bootstrap" else 0)


def _default_data_dir(command: str, environ: Mapping[str, str]) -> Path:
    return data_home(environ) / command


def _default_known_peers(command: str, environ: Mapping[str, str]) -> Path:
    return data_home(environ) / "known_peers"


def _limit(name: str, help: str) -> Any:
    """A storage limit: default and type from :class:`StorageLimits`, TOML table ``[storage]``."""
    default = getattr(_LIMITS, name)
    vtype = integer(lo=1) if isinstance(default, int) else number(lo=0.0, lo_open=True)
    return field(default=default, metadata=spec(vtype, help, DAEMONS, toml=("storage", name)))


@dataclass(frozen=True)
class Settings:
    """The settings of one command run, after merging flags, environment, TOML and defaults.

    Build it with :func:`load`. A command reads only the fields declared for it; the
    others keep their defaults.
    """

    config: Path | None = field(
        default=None,
        metadata=spec(path(), "TOML file to read settings from", toml=None, default_help="none"),
    )
    """TOML file with settings (flag or ``DHTSIGNAL_CONFIG`` only)."""
    log_level: str = field(
        default="warning", metadata=spec(choice(LOG_LEVELS), "log level (logs go to stderr)")
    )
    """Threshold of the log messages written to stderr."""
    network: str = field(
        default=_NODE.network,
        metadata=spec(
            text(_network, "NAME"),
            "network id (nodes must agree; pins are per network)",
            NODES | {"pins"},
        ),
    )
    """Network id carried by every RPC; nodes of other networks are ignored. Pinned keys
    are kept per network id."""
    listen: Addr = field(
        default=("0.0.0.0", 0),
        metadata=spec(
            address(),
            "UDP address to bind",
            NODES,
            per_command=_default_listen,
            default_help=f"0.0.0.0:{BOOTSTRAP_PORT} for bootstrap, 0.0.0.0:0 otherwise",
        ),
    )
    """UDP address of this process's DHT node (port 0: any free port)."""
    join: tuple[Addr, ...] = field(
        default=(),
        metadata=spec(
            address_list(), "other bootstrap node to join (repeatable)", frozenset({"bootstrap"})
        ),
    )
    """Other bootstrap nodes a bootstrap node joins (none for the first node of a network)."""
    bootstrap: tuple[Addr, ...] = field(
        default=(),
        metadata=spec(
            address_list(),
            "bootstrap node to join through (repeatable)",
            frozenset({"peer", "peers", "lookup"}) | DIALERS,
            required=True,
        ),
    )
    """Bootstrap nodes to join the DHT through; at least one must answer."""
    target: Addr | None = field(
        default=None,
        metadata=spec(
            address(), "node to ping", frozenset({"status"}), required=True, default_help="none"
        ),
    )
    """The node ``status`` pings."""
    data_dir: Path | None = field(
        default=None,
        metadata=spec(
            path(),
            "directory of the identity key and saved state",
            DAEMONS,
            per_command=_default_data_dir,
            default_help="$XDG_DATA_HOME/dhtsignal/COMMAND",
        ),
    )
    """Holds ``identity.key`` (mode 0600), routing contacts and stored records."""
    save_interval: float = field(
        default=30.0,
        metadata=spec(number(lo=0.0, lo_open=True), "seconds between state saves", DAEMONS),
    )
    """Seconds between two saves of routing contacts and stored records (also saved on exit)."""
    rejoin_interval: float = field(
        default=10.0,
        metadata=spec(
            number(lo=0.0, lo_open=True),
            "longest wait between joins while the table is empty, seconds",
            DAEMONS,
        ),
    )
    """While the routing table is empty, the join is retried: after 1 s, then with
    doubling waits up to this many seconds (each at a random moment in its second half)."""
    node_id: str | None = field(
        default=None,
        metadata=spec(
            text(_label("node id"), "NAME"),
            "node ID to claim",
            frozenset({"peer"}),
            default_help="the key's self-certifying ID",
        ),
    )
    """The label to claim (first live claim wins); default: the self-certifying ID of the key."""
    room: tuple[str, ...] = field(
        default=(DEFAULT_ROOM,),
        metadata=spec(
            listof(text(_label("room"), "ROOM")),
            "room to announce in (peer) or to list (peers); repeatable",
            frozenset({"peer", "peers"}),
        ),
    )
    """Rooms a peer announces itself in, or whose members ``peers`` lists."""
    presence_ttl: float = field(
        default=60.0,
        metadata=spec(
            number(lo=0.0, hi=MAX_TTL[RecordType.PRESENCE], lo_open=True),
            "lifetime of presence records, seconds (refreshed every third)",
            frozenset({"peer"}),
        ),
    )
    """Lifetime of presence and room records; a crashed peer disappears after it."""
    claim_ttl: float = field(
        default=3600.0,
        metadata=spec(
            number(lo=0.0, hi=MAX_TTL[RecordType.CLAIM], lo_open=True),
            "lifetime of the node-ID claim, seconds (refreshed at half)",
            frozenset({"peer"}),
        ),
    )
    """Lifetime of the node-ID claim record."""
    client_mode: bool = field(
        default=_NODE.client_mode,
        metadata=spec(
            boolean(), "behind NAT: stay out of routing tables, store nothing", frozenset({"peer"})
        ),
    )
    """Client-mode node (query commands always run one)."""
    keepalive_interval: float = field(
        default=15.0,
        metadata=spec(
            number(lo=0.0, hi=3600.0, lo_open=True),
            "client mode: seconds between keepalives to the nodes pushing to us (beat the "
            "NAT's UDP mapping timeout)",
            frozenset({"peer"}),
        ),
    )
    """Client mode: seconds between keepalive pings to the DHT nodes holding the inbox
    subscription, shorter than the NAT's UDP mapping timeout (often 20-30 s)."""
    known_peers: Path | None = field(
        default=None,
        metadata=spec(
            path(optional=True),
            "pinned node-ID keys, per network (like known_hosts); 'none' keeps pins in memory",
            PINNING,
            per_command=_default_known_peers,
            default_help="$XDG_DATA_HOME/dhtsignal/known_peers",
        ),
    )
    """File of pinned keys, one ``NODE_ID KEYHEX [NETWORK]`` per line; None: in memory only."""
    json: bool = field(
        default=False,
        metadata=spec(
            boolean(),
            "print JSON instead of text",
            frozenset({"peers", "lookup", "status", "ping", "recv", "pins"}),
        ),
    )
    """Machine-readable output."""
    count: int = field(
        default=3,
        metadata=spec(
            integer(lo=0, hi=1000), "round trips to measure over the session", frozenset({"ping"})
        ),
    )
    """Round trips ``ping`` measures over the control channel once the session is open."""
    ack_timeout: float = field(
        default=5.0,
        metadata=spec(
            number(lo=0.0, hi=300.0, lo_open=True),
            "seconds to wait for the receiver's acknowledgement",
            frozenset({"send"}),
        ),
    )
    """How long ``send`` waits for the receiving application to acknowledge the message."""
    accept: tuple[str, ...] = field(
        default=(),
        metadata=spec(
            listof(text(_label("node id"), "NODE_ID")),
            "node ID allowed to open sessions (repeatable)",
            frozenset({"peer"}),
            default_help="anyone",
        ),
    )
    """The accept policy: only these node IDs may open sessions; empty accepts anyone."""
    ice_server: tuple[str, ...] = field(
        default=(),
        metadata=spec(
            listof(text(_ice_url, "URL")),
            "STUN/TURN server URL, e.g. stun:HOST:PORT (repeatable)",
            SESSIONS,
            default_help="none: host candidates only",
        ),
    )
    """STUN and TURN servers for ICE; aiortc's public default server is never used."""
    ice_username: str | None = field(
        default=None,
        metadata=spec(text(), "username for the TURN servers", SESSIONS, default_help="none"),
    )
    """Username for every ``turn:``/``turns:`` server."""
    ice_credential: str | None = field(
        default=None,
        metadata=spec(text(), "password for the TURN servers", SESSIONS, default_help="none"),
    )
    """Password for every ``turn:``/``turns:`` server."""
    ice_secret: str | None = field(
        default=None,
        metadata=spec(
            text(),
            "shared secret of the TURN servers (coturn use-auth-secret): mint credentials",
            SESSIONS,
            default_help="none",
        ),
    )
    """coturn's ``static-auth-secret``: each session mints ephemeral TURN credentials
    (username ``EXPIRY:NODE_ID``, password base64 HMAC-SHA1; :mod:`dhtsignal.ice`),
    instead of ``ice_username``/``ice_credential``."""
    ice_host: tuple[str, ...] = field(
        default=(),
        metadata=spec(
            listof(text(_ip, "IP")),
            "gather ICE host candidates on this address only (repeatable)",
            SESSIONS,
            default_help="every interface",
        ),
    )
    """Local IP addresses for ICE host candidates (e.g. 127.0.0.1 to stay on loopback)."""
    rpc_timeout: float = field(
        default=_NODE.rpc_timeout,
        metadata=spec(
            number(lo=0.0, hi=60.0, lo_open=True), "seconds before an RPC is retried", NODES
        ),
    )
    """Seconds before one try of an RPC is retried (the wait grows with each try)."""
    rpc_retries: int = field(
        default=_NODE.rpc_retries,
        metadata=spec(integer(lo=0, hi=10), "tries of an RPC after the first", NODES),
    )
    """Tries of an RPC after the first before it fails."""
    refresh_interval: float = field(
        default=_NODE.refresh_interval,
        metadata=spec(
            number(lo=0.0, hi=86400.0, lo_open=True),
            "seconds after which a silent contact is pinged before it is handed out "
            "and a silent bucket is refreshed",
            NODES,
        ),
    )
    """BEP 5's 15 minutes: how long a contact stays good without being heard from (then it
    is pinged before find replies name it again), and when a silent bucket is refreshed.
    Maintenance runs at least four times per interval."""
    rate_per_source: float = field(
        default=_NODE.rate_per_source,
        metadata=spec(
            number(lo=0.0, metavar="RATE"),
            "requests per second accepted from one host, IPv4 address or IPv6 /64 (0: no limit)",
            DAEMONS,
        ),
    )
    """Per-host request rate limit (every port of the host counts)."""
    rate_per_prefix: float = field(
        default=_NODE.rate_per_prefix,
        metadata=spec(
            number(lo=0.0, metavar="RATE"),
            "requests per second accepted from one prefix, IPv4 /24 or IPv6 /48 (0: no limit)",
            DAEMONS,
        ),
    )
    """Per-prefix request rate limit."""
    daemon: Path | None = field(
        default=None,
        metadata=spec(
            path(),
            "data directory of a running daemon to act through (its node ID, node, sessions)",
            CLIENTS,
            default_help="none: run a throwaway node",
            required=False,
        ),
    )
    """A running daemon's data directory: the command uses its local API (``api.sock``)
    instead of starting a node of its own, and needs no ``bootstrap``."""
    metrics: Addr | None = field(
        default=None,
        metadata=spec(
            address(),
            "serve Prometheus metrics over HTTP at HOST:PORT",
            DAEMONS,
            default_help="none",
        ),
    )
    """Where a daemon serves ``/metrics`` (Prometheus text); None: nowhere."""
    log_format: str = field(
        default="text",
        metadata=spec(choice(LOG_FORMATS), "log line format: text, or json (one object a line)"),
    )
    """How log lines on stderr are written."""
    watch: bool = field(
        default=False,
        metadata=spec(
            boolean(), "keep running and print each join and leave", frozenset({"peers"})
        ),
    )
    """``peers --watch``: print the room's joins and leaves as they happen."""
    storage_max_keys: int = _limit("max_keys", "storage: distinct keys held")
    """Distinct keys held for others."""
    storage_max_values_per_key: int = _limit("max_values_per_key", "storage: records per key")
    """Records (one per signer slot) per key."""
    storage_max_slots_per_signer: int = _limit(
        "max_slots_per_signer", "storage: records of one signer per key"
    )
    """Records (slots) one signer holds under one key; its next one is refused."""
    storage_max_bytes: int = _limit("max_bytes", "storage: total record bytes held")
    """Total encoded record bytes held."""
    storage_max_records: int = _limit("max_records", "storage: records held in total")
    """Records held in total."""
    storage_max_bytes_per_source: int = _limit(
        "max_bytes_per_source", "storage: record bytes per source host (IPv4 address, IPv6 /64)"
    )
    """Encoded record bytes stored on behalf of one source host, whatever its ports."""
    storage_max_records_per_source: int = _limit(
        "max_records_per_source", "storage: records per source host (IPv4 address, IPv6 /64)"
    )
    """Records stored on behalf of one source host."""
    storage_max_bytes_per_prefix: int = _limit(
        "max_bytes_per_prefix", "storage: record bytes per source prefix (IPv4 /24, IPv6 /48)"
    )
    """Encoded record bytes stored on behalf of one source prefix."""
    storage_max_records_per_prefix: int = _limit(
        "max_records_per_prefix", "storage: records per source prefix (IPv4 /24, IPv6 /48)"
    )
    """Records stored on behalf of one source prefix."""
    storage_legacy_max_keys: int = _limit(
        "legacy_max_keys", "storage: plain values kept for stock kademlia nodes"
    )
    """Plain values kept for stock kademlia nodes."""
    storage_legacy_max_value: int = _limit(
        "legacy_max_value", "storage: largest plain value, bytes"
    )
    """Largest plain value accepted, bytes."""
    storage_legacy_ttl: float = _limit("legacy_ttl", "storage: lifetime of a plain value, seconds")
    """How long a plain value is kept without being stored again."""
    storage_max_listeners_per_key: int = _limit(
        "max_listeners_per_key", "storage: subscriptions per key"
    )
    """Subscriptions per key."""
    storage_max_listens_per_source: int = _limit(
        "max_listens_per_source", "storage: subscriptions per source host (IPv4 address, IPv6 /64)"
    )
    """Subscriptions held for one source host."""
    storage_max_listens_per_prefix: int = _limit(
        "max_listens_per_prefix", "storage: subscriptions per source prefix (IPv4 /24, IPv6 /48)"
    )
    """Subscriptions held for one source prefix."""
    storage_max_listens: int = _limit("max_listens", "storage: subscriptions held in total")
    """Subscriptions held in total."""
    storage_max_listen_ttl: float = _limit(
        "max_listen_ttl", "storage: longest subscription granted, seconds"
    )
    """Longest subscription granted."""

    def storage_limits(self) -> StorageLimits:
        """The ``storage_*`` settings as :class:`StorageLimits`."""
        return StorageLimits(
            **{
                f.name: getattr(self, "storage_" + f.name)
                for f in dataclasses.fields(StorageLimits)
            }
        )

    def ice_servers(self) -> list[dict[str, Any]]:
        """The ``ice_*`` settings as WebRTC-style server entries."""
        out: list[dict[str, Any]] = []
        for url in self.ice_server:
            entry: dict[str, Any] = {"urls": url}
            if not url.startswith("stun:") and self.ice_secret is not None:
                entry["secret"] = self.ice_secret
            elif not url.startswith("stun:"):
                entry["username"] = self.ice_username
                entry["credential"] = self.ice_credential
            out.append(entry)
        return out

    def node_config(self, *, client_mode: bool | None = None) -> NodeConfig:
        """The :class:`NodeConfig` these settings describe.

        :param client_mode: overrides the ``client_mode`` setting (query commands pass True).
        """
        return dataclasses.replace(
            _NODE,
            network=self.network,
            rpc_timeout=self.rpc_timeout,
            rpc_retries=self.rpc_retries,
            rate_per_source=self.rate_per_source,
            rate_per_prefix=self.rate_per_prefix,
            rate_prefix_burst=2.0 * self.rate_per_prefix,
            refresh_interval=self.refresh_interval,
            good_for=self.refresh_interval,
            maintenance_interval=min(_NODE.maintenance_interval, self.refresh_interval / 4),
            client_mode=self.client_mode if client_mode is None else client_mode,
            rejoin_delay=min(_NODE.rejoin_delay, self.rejoin_interval),
            rejoin_max=self.rejoin_interval,
            limits=self.storage_limits(),
        )


#: Every setting's spec, by field name, in declaration order.
SPECS: dict[str, Spec] = {f.name: f.metadata["spec"] for f in dataclasses.fields(Settings)}
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Settings)}


def toml_path(name: str) -> tuple[str, ...] | None:
    """Where setting ``name`` sits in a TOML file (None: not read from TOML)."""
    spec = SPECS[name]
    if spec.toml is None:
        return None
    return spec.toml or (name,)


def flag_of(name: str) -> str:
    """The flag of setting ``name``: ``--presence-ttl``."""
    return "--" + name.replace("_", "-")


def env_of(name: str) -> str:
    """The environment variable of setting ``name``: ``DHTSIGNAL_PRESENCE_TTL``."""
    return ENV_PREFIX + name.upper()


def settings_of(command: str) -> list[str]:
    """Names of the settings ``command`` reads, in declaration order."""
    if command not in ALL:
        raise ValueError(f"unknown command {command!r}")
    return [name for name, spec in SPECS.items() if command in spec.commands]


_BY_TOML: dict[tuple[str, ...], str] = {
    p: name for name in SPECS if (p := toml_path(name)) is not None
}
_TOML_TABLES = frozenset(p[0] for p in _BY_TOML if len(p) > 1)


# -- argparse -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Register the flags of ``command``'s settings.

    Flags only collect text (absent ones stay out of the namespace); :func:`load` parses it.
    """
    for name in settings_of(command):
        spec = SPECS[name]
        vtype = spec.vtype
        if spec.default_help is not None:
            shown = spec.default_help
        elif spec.per_command is not None:
            shown = vtype.show(spec.per_command(command, os.environ))
        else:
            shown = vtype.show(_DEFAULTS[name])
        help_text = f"{spec.help} (default: {shown}; env {env_of(name)})"
        help_text = help_text.replace("%", "%%")
        common: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if vtype.is_bool:
            parser.add_argument(flag_of(name), action=argparse.BooleanOptionalAction, **common)
        elif vtype.is_list:
            parser.add_argument(flag_of(name), action="append", metavar=vtype.metavar, **common)
        else:
            parser.add_argument(flag_of(name), metavar=vtype.metavar, **common)


# -- loading ------------------------------------------------------------------------------


def _parse_text(name: str, raw: str, label: str) -> Any:
    try:
        return SPECS[name].vtype.from_text(raw)
    except ValueError as exc:
        raise ConfigError(label, str(exc)) from None


def _from_flag(name: str, raw: Any) -> Any:
    vtype = SPECS[name].vtype
    label = flag_of(name)
    if vtype.is_bool:
        return bool(raw)
    if vtype.is_list:
        items: list[Any] = []
        for occurrence in raw:
            items.extend(_parse_text(name, occurrence, label))
        return tuple(items)
    return _parse_text(name, str(raw), label)


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        with open(file, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", f"{file}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"{file}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{file} is not valid TOML: {exc}") from None


def _toml_table(
    table: Mapping[str, Any], prefix: tuple[str, ...], file: Path, section: str | None
) -> dict[str, Any]:
    """Check every key of one TOML table; return the values by setting name."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        where = (*prefix, key)
        label = ".".join(((section,) if section else ()) + where)
        if not prefix and key in _TOML_TABLES:
            if not isinstance(value, dict):
                raise ConfigError(label, f"expected a table [{key}] (in {file})")
            out.update(_toml_table(value, where, file, section))
            continue
        name = _BY_TOML.get(where)
        if name is None:
            raise ConfigError(label, f"unknown setting (in {file})")
        if section is not None and section not in SPECS[name].commands:
            raise ConfigError(label, f"does not apply to the {section} command (in {file})")
        try:
            out[name] = SPECS[name].vtype.from_toml(value)
        except ValueError as exc:
            raise ConfigError(label, f"{exc} (in {file})") from None
    return out


def _toml_values(command: str, file: Path) -> dict[str, Any]:
    """Settings from a TOML file: top level, then the table named after ``command``."""
    doc = _read_toml(file)
    # A table named after a command is that command's section; the setting named
    # "bootstrap" (a list) and the section [bootstrap] (a table) differ by type.
    sections = {k: v for k, v in doc.items() if k in ALL and isinstance(v, dict)}
    top = {k: v for k, v in doc.items() if k not in sections}
    values = _toml_table(top, (), file, None)
    for cmd, section in sections.items():
        checked = _toml_table(section, (), file, cmd)
        if cmd == command:
            values.update(checked)
    return values


def load(
    command: str, flags: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> Settings:
    """Merge the settings of ``command``: flags > environment > TOML file > defaults.

    :param command: one of :data:`COMMANDS`.
    :param flags: the argparse namespace as a dict (absent flags absent).
    :param environ: the environment (default ``os.environ``).
    :raises ConfigError: a bad value, an unknown TOML key, a missing required setting.
    """
    env = os.environ if environ is None else environ
    names = settings_of(command)
    values: dict[str, Any] = {}
    for name in names:
        factory = SPECS[name].per_command
        if factory is not None:
            values[name] = factory(command, env)

    config_file: Path | None = None
    if "config" in flags:
        config_file = _from_flag("config", flags["config"])
    elif env.get(env_of("config")):
        config_file = _parse_text("config", env[env_of("config")], env_of("config"))
    if config_file is not None:
        for name, value in _toml_values(command, config_file).items():
            if name in names:
                values[name] = value
        values["config"] = config_file

    for name in names:
        raw = env.get(env_of(name))
        if raw is not None and name != "config":
            values[name] = _parse_text(name, raw, env_of(name))
    for name in names:
        if name in flags:
            values[name] = _from_flag(name, flags[name])

    through_daemon = values.get("daemon") is not None  # the daemon has its own bootstrap
    for name in names:
        spec = SPECS[name]
        if spec.required and not through_daemon and not values.get(name, _DEFAULTS[name]):
            raise ConfigError(
                name,
                f"required by '{command}' ({flag_of(name)} {spec.vtype.metavar}, "
                f"{env_of(name)}, or {name} in the config file)",
            )
    return Settings(**values)


def dump(settings: Settings, command: str) -> str:
    """The settings ``command`` reads, as a TOML file :func:`load` reads back.

    Settings without a value (None) are written as comments.
    """
    top: list[str] = []
    tables: dict[str, list[str]] = {}
    for name in settings_of(command):
        where = toml_path(name)
        if where is None:
            continue
        value = getattr(settings, name)
        if value is None and not SPECS[name].vtype.nullable:
            line = f"# {where[-1]} is not set"
        else:
            line = f"{where[-1]} = {SPECS[name].vtype.to_toml(value)}"
        (tables.setdefault(where[0], []) if len(where) > 1 else top).append(line)
    parts = ["\n".join(top)]
    parts += [f"[{table}]\n" + "\n".join(lines) for table, lines in tables.items()]
    return "\n\n".join(parts) + "\n"
