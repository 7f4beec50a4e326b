"""The commands of the ``dhtsignal`` program: the one table every other part reads.

The CLI builds its parser from it (:mod:`dhtsignal.cli`: help lines, descriptions,
positional arguments, which commands are daemons), and the settings (:mod:`dhtsignal.config`)
say which commands take a setting through the groups derived here (:data:`DAEMONS`,
:data:`QUERIES`, :data:`DIALERS`, ...). A command's code is attached to its name in
:mod:`dhtsignal.cli`. This module imports nothing of dhtsignal, so the CLI can read it
before it loads anything else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class Positional:
    """A positional argument of a command."""

    dest: str
    """The attribute of the parsed namespace."""
    metavar: str
    """Its name in ``--help``."""
    help: str
    """Its line in ``--help``."""
    choices: tuple[str, ...] | None = None
    """The words it may be (None: any)."""
    optional: bool = False
    """It may be left out (then None)."""


class Role(enum.Enum):
    """What a command does, which decides the settings it takes and how it stops."""

    DAEMON = "daemon"
    """Runs a node until stopped (SIGTERM/SIGINT end it cleanly)."""
    QUERY = "query"
    """A short-lived client node that reads the DHT, prints and exits."""
    PROBE = "probe"
    """Talks to one DHT node and exits."""
    DIALER = "dialer"
    """A short-lived anonymous peer that opens one WebRTC session."""
    DEMO = "demo"
    """Runs a whole network inside one process."""
    CLIENT = "client"
    """Talks to a running daemon through its local API (:mod:`dhtsignal.api`); no node."""
    LOCAL = "local"
    """Reads or changes local files only; runs no node."""


@dataclass(frozen=True)
class Command:
    """One command of the program."""

    name: str
    """The word on the command line."""
    role: Role
    """What it does (see :class:`Role`)."""
    summary: str
    """Its one line in the program's ``--help``."""
    description: str
    """The paragraph of its own ``--help``."""
    positionals: tuple[Positional, ...] = ()
    """Its positional arguments, in order."""


_TARGET = Positional("target_id", "NODE_ID", "label or self-certifying ID")
_DIAL_TARGET = Positional("target_id", "NODE_ID", "label or self-certifying ID to dial")

#: The commands, in the order ``--help`` lists them.
COMMANDS: tuple[Command, ...] = (
    Command(
        "bootstrap",
        Role.DAEMON,
        "run a long-lived bootstrap node",
        "Run a long-lived DHT node others join through. Prints one line "
        "'ready bootstrap id=... addr=HOST:PORT' when it serves; keeps routing contacts and "
        "stored records in the data directory across restarts; SIGTERM or SIGINT stop it.",
    ),
    Command(
        "peer",
        Role.DAEMON,
        "run a peer daemon: claim a node ID and stay online",
        "Join the DHT, claim a node ID (first live claim wins), publish presence in "
        "its rooms, print 'ready peer node_id=... key=... addr=...', and stay online. SIGTERM "
        "or SIGINT sign it off at once.",
    ),
    Command(
        "peers",
        Role.QUERY,
        "list the online peers of a room",
        "List the peers online in one or more rooms (default: lobby).",
    ),
    Command(
        "lookup",
        Role.QUERY,
        "show one peer's presence (exit 1 if offline or unknown)",
        "Show the presence of NODE_ID (a label or a self-certifying ID). Exit 1 "
        "with the reason on stderr if it is offline or unknown, or if its key differs from "
        "the one pinned in the known-peers file.",
        (_TARGET,),
    ),
    Command(
        "status",
        Role.PROBE,
        "ping a node: print its routing ID and round-trip time (exit 1 if silent)",
        "Ping the node at --target; prints its routing ID and the round-trip time.",
    ),
    Command(
        "ping",
        Role.DIALER,
        "open a WebRTC session to a node ID and measure setup time and round trips",
        "Run a short-lived peer with a throwaway key, open a WebRTC session to NODE_ID "
        "through the DHT, measure --count round trips over the data channel, and print the "
        "setup time split into resolve, signaling, ICE and DTLS/SCTP, and the selected "
        "candidate pair's types. Exit 1 with the reason on stderr if no session opens.",
        (_DIAL_TARGET,),
    ),
    Command(
        "send",
        Role.DIALER,
        "deliver one message to a node ID (exit 0 once its daemon acknowledged it)",
        "Open a session to NODE_ID with a throwaway key, send TEXT, and exit 0 once the "
        "receiving application acknowledged it (a peer daemon prints it as 'message from "
        "NODE_ID: TEXT'). Exit 1 with the reason otherwise.",
        (_DIAL_TARGET, Positional("text", "TEXT", "the message")),
    ),
    Command(
        "chat",
        Role.DIALER,
        "an interactive chat with a node ID over a WebRTC data channel",
        "Open a session to NODE_ID; each line typed is sent, each message received is "
        "printed. End of input (Ctrl-D) or the remote closing ends it.",
        (_DIAL_TARGET,),
    ),
    Command(
        "recv",
        Role.CLIENT,
        "stream the messages a running daemon receives (--daemon DATA_DIR)",
        "Connect to the peer daemon of --daemon DATA_DIR and print every message it "
        "receives, as 'message from NODE_ID: TEXT' or, with --json, one JSON event per line, "
        "until interrupted or the daemon stops. Answer with 'send NODE_ID TEXT --daemon "
        "DATA_DIR'.",
    ),
    Command(
        "pins",
        Role.LOCAL,
        "list or forget pinned node-ID keys (the known-peers file)",
        "'pins list' shows every pin of the known-peers file: network id, node ID and "
        "key (--json: a list of objects). 'pins forget NODE_ID' removes the pin of NODE_ID "
        "in the network given by --network (default: the default network), so that the "
        "next lookup or dial pins the key the DHT presents then. Pins are written only by "
        "your own lookups and dials, one set per network id.",
        (
            Positional("action", "ACTION", "list or forget", choices=("list", "forget")),
            Positional("pin_id", "NODE_ID", "the node ID whose pin to forget", optional=True),
        ),
    ),
    Command(
        "demo",
        Role.DEMO,
        "the embedded demo: a whole network on loopback, one dial, a timeline",
        "On loopback only: start a bootstrap node, a few DHT nodes and two peers, dial "
        "by node ID, exchange messages, and print a timeline with the measured setup time.",
    ),
)

BY_NAME: dict[str, Command] = {c.name: c for c in COMMANDS}
"""The commands by name."""
NAMES: tuple[str, ...] = tuple(BY_NAME)
"""The command names, in ``--help`` order."""


def _with(role: Role) -> frozenset[str]:
    return frozenset(c.name for c in COMMANDS if c.role is role)


ALL = frozenset(NAMES)
DAEMONS = _with(Role.DAEMON)
"""The commands that run until stopped."""
QUERIES = _with(Role.QUERY)
"""The commands that read the DHT and print."""
DIALERS = _with(Role.DIALER)
"""Short-lived peers that open one session."""
SESSIONS = DIALERS | {"peer"}
"""The commands that run WebRTC sessions."""
NODES = ALL - _with(Role.DEMO) - _with(Role.CLIENT) - _with(Role.LOCAL)
"""The commands that run a DHT node of their own (``demo`` runs a whole network inside,
``pins`` and ``recv`` none)."""
CLIENTS = frozenset({"send", "ping", "chat", "peers", "lookup", "status"}) | _with(Role.CLIENT)
"""The commands that can use a running daemon's local API (``--daemon DATA_DIR``)."""
PINNING = QUERIES | DIALERS | {"pins"}
"""The commands that read the known-peers file."""
