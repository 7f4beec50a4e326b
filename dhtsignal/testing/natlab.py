"""A two-NAT lab of Linux network namespaces with nftables NAT (root only).

Theory of operation
-------------------
:class:`Lab` builds, in namespaces whose names start with a unique prefix (labs can run
side by side), this network::

    pub   bridge "br0" 198.18.0.1-4/24 (the public network: DHT nodes, coturn), and a
          silent default route (a veth whose peer stays down), so that nothing leaves
          the lab and coturn's relaying toward private addresses goes nowhere
    ra    router of alice: "wan" 198.18.0.11 on the bridge, "lan" 10.1.0.1/24
    rb    router of bob:   "wan" 198.18.0.12 on the bridge, "lan" 10.2.0.1/24
    a     alice: 10.1.0.2/24, default route via ra
    b     bob:   10.2.0.2/24, default route via rb

Every veth is created inside the lab's namespaces (never in the caller's). A router
masquerades what leaves "wan": ``cone`` is plain ``masquerade`` (endpoint-independent
mapping, port-restricted filtering by conntrack), ``symmetric`` is ``masquerade random``
(a new port per destination). Each router drops unsolicited packets to its own WAN
address in the input hook: if it accepted them, conntrack would record them and
masquerade would later remap the real flow to another port. With ``udp_timeout`` the
router's conntrack forgets idle UDP mappings after that many seconds
(``nf_conntrack_udp_timeout`` and ``_stream``, per namespace).

:meth:`Lab.start` runs a ``dhtsignal`` process in a namespace (``ip netns exec``, which
execs, so the PID is the program's); :meth:`Lab.close` kills every process by PID and
deletes the namespaces, also after a failure half-way through building.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

PUBLIC = ["198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.4"]
"""Addresses of the public network's hosts (RFC 2544 benchmarking range: not private,
so coturn's denied private ranges do not cover them)."""
WAN = {"a": "198.18.0.11", "b": "198.18.0.12"}
"""The routers' public addresses."""
LAN = {"a": ("10.1.0.1", "10.1.0.2"), "b": ("10.2.0.1", "10.2.0.2")}
"""(router, host) private addresses behind each router."""
NAT_TYPES = ("cone", "symmetric")
"""Router behaviours."""
DHT_PORT = 4000
TURN_PORT = 3478


class LabUnavailable(Exception):
    """Network namespaces cannot be created here (not root, or no ``ip``/``nft``)."""


def check_available() -> None:
    """Raise :class:`LabUnavailable` with the reason if a lab cannot be built here."""
    if os.geteuid() != 0:
        raise LabUnavailable("network namespaces need root")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            raise LabUnavailable(f"the {tool!r} command is not installed")
    name = f"dsprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        raise LabUnavailable(f"'ip netns add' failed: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Proc:
    """A process in a namespace whose stdout lines a thread reads."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 (closed in kill())
        self.popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        self.pid = self.popen.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def stderr(self) -> str:
        """What it wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def ready(self, timeout: float = 20.0) -> dict[str, str]:
        """The ``key=value`` fields of its ready line (waits at most ``timeout``).

        :raises RuntimeError: no ready line in time, or the process exited.
        """
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"no ready line in {timeout} s: {self.stderr()}") from None
        if line is None or not line.startswith("ready "):
            raise RuntimeError(f"not ready ({line!r}): {self.stderr()}")
        return dict(w.split("=", 1) for w in line.split()[2:])

    def kill(self) -> None:
        """SIGKILL by PID if still running, and reap."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        try:
            self.popen.wait(10)
        finally:
            if self.popen.stdout is not None:
                self.popen.stdout.close()
            self._log.close()


class Lab:
    """The lab; use as a context manager (built on entry, torn down on exit).

    :param workdir: where data directories and logs go.
    :param nat_a: alice's router, ``cone`` or ``symmetric``.
    :param nat_b: bob's router.
    :param dht_nodes: DHT bootstrap processes on the public network (1-4).
    :param turn_secret: run coturn with this ``use-auth-secret`` secret (None: no TURN).
    :param udp_timeout: the routers' idle UDP mapping timeout, seconds (None: default).
    """

    def __init__(
        self,
        workdir: Path,
        nat_a: str = "cone",
        nat_b: str = "cone",
        *,
        dht_nodes: int = 4,
        turn_secret: str | None = None,
        udp_timeout: int | None = None,
    ) -> None:
        if nat_a not in NAT_TYPES or nat_b not in NAT_TYPES:
            raise ValueError(f"NAT types are {NAT_TYPES}")
        self.workdir = workdir
        self.nats = {"a": nat_a, "b": nat_b}
        self.dht_nodes = max(1, min(dht_nodes, len(PUBLIC)))
        self.turn_secret = turn_secret
        self.udp_timeout = udp_timeout
        self.prefix = f"ds{os.getpid() % 100000}x{time.monotonic_ns() % 1000}"
        self.procs: list[Proc] = []
        self._made: list[str] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DHTSIGNAL_")}
        self.env["XDG_DATA_HOME"] = str(workdir / "xdg")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parents[2]), self.env.get("PYTHONPATH", "")]
        )

    def ns(self, name: str) -> str:
        """The full name of the lab namespace ``name`` (pub, ra, rb, a, b)."""
        return self.prefix + name

    @property
    def bootstrap(self) -> list[str]:
        """``HOST:PORT`` of the DHT nodes."""
        return [f"{h}:{DHT_PORT}" for h in PUBLIC[: self.dht_nodes]]

    @property
    def turn_url(self) -> str:
        """The coturn server's URL."""
        return f"turn:{PUBLIC[0]}:{TURN_PORT}?transport=udp"

    def __enter__(self) -> Lab:
        try:
            self.build()
            self.start_public()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ip(self, ns: str, *args: str) -> None:
        self._run(["ip", "-n", self.ns(ns), *args])

    def _exec(self, ns: str, *args: str, stdin: str | None = None) -> None:
        self._run(["ip", "netns", "exec", self.ns(ns), *args], stdin)

    @staticmethod
    def _run(argv: Sequence[str], stdin: str | None = None) -> None:
        done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")

    def build(self) -> None:
        """Make the namespaces, links, addresses, routes and NAT rules."""
        for name in ("pub", "ra", "rb", "a", "b"):
            self._run(["ip", "netns", "add", self.ns(name)])
            self._made.append(self.ns(name))
            self._ip(name, "link", "set", "lo", "up")
        self._ip("pub", "link", "add", "name", "br0", "type", "bridge")
        self._ip("pub", "link", "set", "br0", "up")
        for h in PUBLIC:
            self._ip("pub", "addr", "add", f"{h}/24", "dev", "br0")
        # The silent default route: a veth whose peer stays down.
        self._ip("pub", "link", "add", "name", "sink", "type", "veth", "peer", "name", "sinkp")
        self._ip("pub", "link", "set", "sink", "up")
        self._ip("pub", "route", "add", "default", "dev", "sink")
        for side in ("a", "b"):
            router, host = "r" + side, side
            # WAN: router <-> the public bridge.
            self._ip(router, "link", "add", "name", "wan", "type", "veth",
                     "peer", "name", f"p{side}", "netns", self.ns("pub"))  # fmt: skip
            self._ip("pub", "link", "set", f"p{side}", "master", "br0", "up")
            self._ip(router, "addr", "add", f"{WAN[side]}/24", "dev", "wan")
            self._ip(router, "link", "set", "wan", "up")
            # LAN: router <-> the host behind it.
            gw, addr = LAN[side]
            self._ip(router, "link", "add", "name", "lan", "type", "veth", "peer", "name", "eth0",
                     "netns", self.ns(host))  # fmt: skip
            self._ip(router, "addr", "add", f"{gw}/24", "dev", "lan")
            self._ip(router, "link", "set", "lan", "up")
            self._ip(host, "addr", "add", f"{addr}/24", "dev", "eth0")
            self._ip(host, "link", "set", "eth0", "up")
            self._ip(host, "route", "add", "default", "via", gw)
            self._exec(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            random = " random" if self.nats[side] == "symmetric" else ""
            self._exec(
                router,
                "nft",
                "-f",
                "-",
                stdin=_RULES.format(random=random, known=", ".join([*PUBLIC, *WAN.values()])),
            )
            if self.udp_timeout is not None:
                t = self.udp_timeout
                self._exec(
                    router,
                    "sysctl",
                    "-qw",
                    f"net.netfilter.nf_conntrack_udp_timeout={t}",
                    f"net.netfilter.nf_conntrack_udp_timeout_stream={t}",
                )

    def stray_packets(self, side: str) -> int:
        """Packets the router of ``side`` sent out to an address outside the lab's
        public hosts (DHT nodes, coturn, the other router): a third-party server."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns("r" + side), "nft", "list", "counter", "ip",
             "natlab", "stray"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        words = done.stdout.split()
        return int(words[words.index("packets") + 1])

    def start(self, ns: str, name: str, *args: str) -> Proc:
        """Start ``python -m dhtsignal ARGS`` in namespace ``ns``."""
        argv = ["ip", "netns", "exec", self.ns(ns), sys.executable, "-m", "dhtsignal", *args]
        proc = Proc(argv, self.workdir / f"{name}.log", self.env)
        self.procs.append(proc)
        return proc

    def run(self, ns: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``python -m dhtsignal ARGS`` in namespace ``ns`` to completion."""
        argv = ["ip", "netns", "exec", self.ns(ns), sys.executable, "-m", "dhtsignal", *args]
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def start_public(self) -> None:
        """Start the DHT nodes (and coturn) on the public network; wait until ready."""
        nodes = []
        for i, host in enumerate(PUBLIC[: self.dht_nodes]):
            join = ["--join", f"{PUBLIC[0]}:{DHT_PORT}"] if i else []
            nodes.append(
                self.start(
                    "pub",
                    f"dht{i}",
                    "bootstrap",
                    *(
                        "--listen",
                        f"{host}:{DHT_PORT}",
                        "--data-dir",
                        str(self.workdir / f"dht{i}"),
                    ),
                    *join,
                )
            )
            if i == 0:
                nodes[0].ready()
        for node in nodes[1:]:
            node.ready()
        if self.turn_secret is not None:
            self._start_coturn(self.turn_secret)

    def _start_coturn(self, secret: str) -> None:
        exe = shutil.which("turnserver")
        if exe is None:
            raise LabUnavailable("coturn's turnserver is not installed")
        argv = [
            "ip", "netns", "exec", self.ns("pub"), exe, "-n",
            "--listening-ip", PUBLIC[0], "--relay-ip", PUBLIC[0],
            "--listening-port", str(TURN_PORT),
            "--use-auth-secret", "--static-auth-secret", secret, "--realm", "natlab",
            "--denied-peer-ip", "10.0.0.0-10.255.255.255",
            "--denied-peer-ip", "172.16.0.0-172.31.255.255",
            "--denied-peer-ip", "192.168.0.0-192.168.255.255",
            "--no-tls", "--no-dtls", "--no-tcp", "--no-cli",
            "--pidfile", str(self.workdir / "turnserver.pid"), "--log-file", "stdout",
        ]  # fmt: skip
        proc = Proc(argv, self.workdir / "turnserver.log", self.env)
        self.procs.append(proc)
        probe = [
            "ip", "netns", "exec", self.ns("pub"), sys.executable, "-c", _PROBE,
            PUBLIC[0], str(TURN_PORT),
        ]  # fmt: skip
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"coturn did not answer: {proc.stderr()}")

    def close(self) -> None:
        """Kill every process (by PID) and delete the namespaces."""
        for proc in reversed(self.procs):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                proc.kill()
        self.procs = []
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._made = []


_RULES = """
table ip natlab {{
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade{random}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }}
    counter stray {{}}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
        oifname "wan" ip daddr != {{ {known} }} counter name "stray"
    }}
}}
"""

# Sends STUN Binding requests until one is answered (bounded: 50 x 0.2 s).
_PROBE = """
import os, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.2)
for _ in range(50):
    tx = os.urandom(12)
    s.sendto(struct.pack("!HHI", 1, 0, 0x2112A442) + tx, (sys.argv[1], int(sys.argv[2])))
    try:
        if s.recvfrom(2048)[0][8:20] == tx:
            sys.exit(0)
    except TimeoutError:
        pass
sys.exit(1)
"""
