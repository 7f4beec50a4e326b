"""Settings: precedence flags > environment > TOML > defaults, bad values, the shipped files.

Precedence is checked twice: in-process through :func:`dhtsignal.config.load`, and end to end in
a subprocess through ``--print-config``. Every kind of bad value is run as a real process: exit
status 2, one line on stderr naming the setting, no traceback.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dhtsignal import commands, config
from dhtsignal.config import Settings, load
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.storage import StorageLimits
from dhtsignal.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
ENTRY = "192.0.2.1:4000"


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DHTSIGNAL_")}
    env["XDG_DATA_HOME"] = str(tmp / "xdg")
    env.update(extra)
    return env


def _run(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dhtsignal", *args],
        capture_output=True,
        text=True,
        env=_env(tmp, **env),
        timeout=20,
        stdin=subprocess.DEVNULL,
    )


def _toml(tmp: Path, text: str, name: str = "settings.toml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


# -- precedence ---------------------------------------------------------------------------


def test_precedence_in_process(tmp_path: Path) -> None:
    file = _toml(
        tmp_path,
        'presence_ttl = 10.0\nrpc_retries = 4\nroom = ["t1"]\nnetwork = "from-toml"\n'
        'bootstrap = ["192.0.2.9:9"]\n',
    )
    env = {"DHTSIGNAL_PRESENCE_TTL": "20", "DHTSIGNAL_ROOM": "e1, e2", "XDG_DATA_HOME": "/xdg"}
    flags = {"config": str(file), "presence_ttl": "30", "node_id": "alice"}
    s = load("peer", flags, env)
    assert s.presence_ttl == 30.0  # flag over env over TOML
    assert s.room == ("e1", "e2")  # env over TOML
    assert s.rpc_retries == 4 and s.network == "from-toml"  # TOML over default
    assert s.bootstrap == (("192.0.2.9", 9),)
    assert s.claim_ttl == 3600.0  # default
    assert s.data_dir == Path("/xdg/dhtsignal/peer")  # computed default
    assert s.config == file
    assert s.node_config().rpc_retries == 4


def test_precedence_end_to_end(tmp_path: Path) -> None:
    file = _toml(
        tmp_path,
        'claim_ttl = 100.0\npresence_ttl = 10.0\nrpc_timeout = 1.5\nbootstrap = ["192.0.2.9:9"]\n'
        "[storage]\nmax_keys = 7\n",
    )
    res = _run(
        tmp_path,
        *("peer", "--presence-ttl", "30", "--room", "f1", "--room", "f2,f3", "--print-config"),
        DHTSIGNAL_CONFIG=str(file),
        DHTSIGNAL_PRESENCE_TTL="20",
        DHTSIGNAL_CLAIM_TTL="200",
        DHTSIGNAL_ROOM="e1",
        DHTSIGNAL_STORAGE_MAX_VALUES_PER_KEY="9",
    )
    assert res.returncode == 0, res.stderr
    eff = tomllib.loads(res.stdout)
    assert eff["presence_ttl"] == 30.0  # flag
    assert eff["room"] == ["f1", "f2", "f3"]  # flags replace the env list
    assert eff["claim_ttl"] == 200.0  # env over TOML
    assert eff["rpc_timeout"] == 1.5  # TOML over default
    assert eff["storage"]["max_keys"] == 7
    assert eff["storage"]["max_values_per_key"] == 9
    assert eff["rpc_retries"] == NodeConfig().rpc_retries  # default
    assert eff["bootstrap"] == ["192.0.2.9:9"]


def test_command_table_overrides_top_level_for_that_command_only(tmp_path: Path) -> None:
    file = _toml(
        tmp_path,
        'listen = "127.0.0.1:5000"\nbootstrap = ["192.0.2.1:1"]\n'
        '[lookup]\nlisten = "127.0.0.1:0"\n',
    )
    assert load("lookup", {"config": str(file)}, {}).listen == ("127.0.0.1", 0)
    assert load("peer", {"config": str(file)}, {}).listen == ("127.0.0.1", 5000)


def test_settings_of_other_commands_in_a_file_are_ignored(tmp_path: Path) -> None:
    file = _toml(tmp_path, 'node_id = "alice"\npresence_ttl = 5.0\nbootstrap = ["192.0.2.1:1"]\n')
    s = load("lookup", {"config": str(file)}, {"DHTSIGNAL_NODE_ID": "bob"})
    assert s.node_id is None and s.presence_ttl == Settings().presence_ttl


def test_print_config_round_trips(tmp_path: Path) -> None:
    s = load(
        "peer", {"bootstrap": [ENTRY], "node_id": "n1", "room": ["a,b"]}, {"XDG_DATA_HOME": "/x"}
    )
    again = load("peer", {"config": str(_toml(tmp_path, config.dump(s, "peer")))}, {})
    assert dataclasses.replace(again, config=None) == s


def test_nodes_file_in_bootstrap_list(tmp_path: Path) -> None:
    nodes = _toml(
        tmp_path, "# bootstrap nodes\n192.0.2.1:4000  # one\n\n[2001:db8::1]:4000\n", "n.txt"
    )
    s = load("peers", {"bootstrap": [f"@{nodes},192.0.2.2:4001"]}, {})
    assert s.bootstrap == (("192.0.2.1", 4000), ("2001:db8::1", 4000), ("192.0.2.2", 4001))


def test_shipped_nodes_files() -> None:
    """bootstrap/compose-nodes.txt lists the compose file's three nodes; nodes.txt is empty
    on purpose (no public nodes exist), and an empty list is refused naming the setting."""
    here = Path(__file__).resolve().parent.parent / "bootstrap"
    s = load("peers", {"bootstrap": [f"@{here / 'compose-nodes.txt'}"]}, {})
    assert s.bootstrap == (("127.0.0.1", 4000), ("127.0.0.1", 4001), ("127.0.0.1", 4002))
    with pytest.raises(ConfigError) as exc:
        load("peers", {"bootstrap": [f"@{here / 'nodes.txt'}"]}, {})
    assert exc.value.setting == "--bootstrap" and "no address" in str(exc.value)


# -- bad values -----------------------------------------------------------------------------

BAD_TOML = "presence_ttl = -3.0\n"

#: (case id, command line, environment, TOML text or None, what stderr must name)
BAD_CASES = [
    ("toml-unknown-key", ["peer", "--bootstrap", ENTRY], {}, "presence_tl = 3.0\n", "presence_tl"),
    ("toml-wrong-type", ["peer", "--bootstrap", ENTRY], {}, 'presence_ttl = "3"\n', "presence_ttl"),
    (
        "toml-bool-not-int",
        ["peer", "--bootstrap", ENTRY],
        {},
        "rpc_retries = true\n",
        "rpc_retries",
    ),
    ("toml-negative-ttl", ["peer", "--bootstrap", ENTRY], {}, BAD_TOML, "presence_ttl"),
    ("toml-bad-limit", ["bootstrap"], {}, "[storage]\nmax_keys = 0\n", "storage.max_keys"),
    ("toml-unknown-table", ["bootstrap"], {}, "[storrage]\nmax_keys = 1\n", "storrage"),
    ("toml-not-toml", ["bootstrap"], {}, "listen = \n", "config"),
    (
        "toml-wrong-section",
        ["lookup", "x", "--bootstrap", ENTRY],
        {},
        '[lookup]\nnode_id = "a"\n',
        "lookup.node_id",
    ),
    ("missing-config-file", ["bootstrap", "--config", "/nonexistent.toml"], {}, None, "config"),
    ("flag-bad-addr", ["peers", "--bootstrap", "192.0.2.1"], {}, None, "--bootstrap"),
    ("flag-bad-port", ["bootstrap", "--listen", "0.0.0.0:70000"], {}, None, "--listen"),
    (
        "flag-bad-label",
        ["peer", "--bootstrap", ENTRY, "--node-id", "no spaces"],
        {},
        None,
        "--node-id",
    ),
    ("flag-bad-room", ["peer", "--bootstrap", ENTRY, "--room", "-lab"], {}, None, "--room"),
    (
        "flag-negative-ttl",
        ["peer", "--bootstrap", ENTRY, "--presence-ttl", "-1"],
        {},
        None,
        "--presence-ttl",
    ),
    (
        "flag-ttl-over-max",
        ["peer", "--bootstrap", ENTRY, "--claim-ttl", "1e9"],
        {},
        None,
        "--claim-ttl",
    ),
    (
        "flag-not-a-number",
        ["lookup", "x", "--bootstrap", ENTRY, "--rpc-timeout", "fast"],
        {},
        None,
        "--rpc-timeout",
    ),
    ("flag-bad-log-level", ["bootstrap", "--log-level", "loud"], {}, None, "--log-level"),
    (
        "env-bad-addr",
        ["peers"],
        {"DHTSIGNAL_BOOTSTRAP": "192.0.2.1:4000,nope"},
        None,
        "DHTSIGNAL_BOOTSTRAP",
    ),
    (
        "env-negative-ttl",
        ["peer", "--bootstrap", ENTRY],
        {"DHTSIGNAL_PRESENCE_TTL": "-5"},
        None,
        "DHTSIGNAL_PRESENCE_TTL",
    ),
    (
        "env-bad-bool",
        ["peer", "--bootstrap", ENTRY],
        {"DHTSIGNAL_CLIENT_MODE": "maybe"},
        None,
        "DHTSIGNAL_CLIENT_MODE",
    ),
    (
        "env-bad-label",
        ["peer", "--bootstrap", ENTRY],
        {"DHTSIGNAL_NODE_ID": "a/b"},
        None,
        "DHTSIGNAL_NODE_ID",
    ),
    ("missing-required", ["lookup", "alice"], {}, None, "bootstrap"),
    ("bad-lookup-id", ["lookup", "not valid", "--bootstrap", ENTRY], {}, None, "NODE_ID"),
    ("unknown-flag", ["peers", "--bootstrap", ENTRY, "--colour"], {}, None, "--colour"),
    ("flag-bad-count", ["ping", "bob", "--bootstrap", ENTRY, "--count", "-1"], {}, None, "--count"),
    (
        "flag-bad-ice-server",
        ["send", "bob", "hi", "--bootstrap", ENTRY, "--ice-server", "http://x"],
        {},
        None,
        "--ice-server",
    ),
    (
        "env-bad-ice-host",
        ["chat", "bob", "--bootstrap", ENTRY],
        {"DHTSIGNAL_ICE_HOST": "localhost"},
        None,
        "DHTSIGNAL_ICE_HOST",
    ),
    (
        "flag-bad-accept",
        ["peer", "--bootstrap", ENTRY, "--accept", "a b"],
        {},
        None,
        "--accept",
    ),
    ("bad-ping-id", ["ping", "a/b", "--bootstrap", ENTRY], {}, None, "NODE_ID"),
    ("send-without-text", ["send", "bob", "--bootstrap", ENTRY], {}, None, "TEXT"),
    ("ping-needs-bootstrap", ["ping", "bob"], {}, None, "bootstrap"),
    ("unknown-command", ["serve"], {}, None, "serve"),
    # Values that parse but fail when used: named as settings too, with value and reason.
    # "{tmp}" is the test's directory, holding the files _bad_files() writes.
    (
        "listen-not-local",
        ["bootstrap", "--listen", "192.0.2.1:4000"],
        {},
        None,
        "'listen': cannot listen on 192.0.2.1:4000: ",
    ),
    (
        "listen-not-local-ping",  # a Peer (ping, send, chat) binds through the same path
        ["ping", "alice", "--bootstrap", "127.0.0.1:9", "--listen", "192.0.2.1:0"],
        {},
        None,
        "'listen': cannot listen on 192.0.2.1:0: ",
    ),
    (
        "listen-unresolvable",
        ["status", "--target", "127.0.0.1:9", "--listen", "nosuchhost.invalid:0"],
        {},
        None,
        "'listen': cannot listen on nosuchhost.invalid:0: ",
    ),
    (
        "known-peers-malformed",
        ["lookup", "alice", "--bootstrap", ENTRY, "--known-peers", "{tmp}/bad_pins"],
        {},
        None,
        "'known_peers': {tmp}/bad_pins:2: expected 'NODE_ID KEYHEX [NETWORK]'",
    ),
    (
        "known-peers-bad-key",
        ["peers", "--bootstrap", ENTRY],
        {"DHTSIGNAL_KNOWN_PEERS": "{tmp}/short_key_pins"},
        None,
        "'known_peers': {tmp}/short_key_pins:1: expected 'NODE_ID KEYHEX [NETWORK]'",
    ),
    (
        "known-peers-directory",
        ["lookup", "alice", "--bootstrap", ENTRY, "--known-peers", "{tmp}"],
        {},
        None,
        "'known_peers': cannot read {tmp}: ",
    ),
    (
        "data-dir-is-a-file",
        ["bootstrap", "--listen", "127.0.0.1:0", "--data-dir", "{tmp}/a_file"],
        {},
        None,
        "'data_dir': {tmp}/a_file is not a directory",
    ),
    (
        "data-dir-below-a-file",
        ["peer", "--bootstrap", ENTRY, "--listen", "127.0.0.1:0"],
        {"DHTSIGNAL_DATA_DIR": "{tmp}/a_file/peer"},
        None,
        "'data_dir': {tmp}/a_file/peer: ",
    ),
    (
        "data-dir-bad-identity-key",
        ["bootstrap", "--listen", "127.0.0.1:0", "--data-dir", "{tmp}/bad_identity"],
        {},
        None,
        "'data_dir': {tmp}/bad_identity/identity.key is not a dhtsignal identity key or is damaged",
    ),
]


def _bad_files(tmp: Path) -> None:
    """The unusable files the bad cases name."""
    (tmp / "bad_pins").write_text(f"# pins\nalice {'ab' * 32} extra words\n")
    (tmp / "short_key_pins").write_text("alice abcd\n")
    (tmp / "a_file").write_text("not a directory\n")
    (tmp / "bad_identity").mkdir()
    (tmp / "bad_identity" / "identity.key").write_bytes(b"short")


@pytest.mark.parametrize(
    ("args", "env", "toml_text", "named"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_CASES],
)
def test_bad_value_exits_2_naming_the_setting(
    tmp_path: Path, args: list[str], env: dict[str, str], toml_text: str | None, named: str
) -> None:
    _bad_files(tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    env = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    named = named.format(tmp=tmp_path)
    if toml_text is not None:
        env = {**env, "DHTSIGNAL_CONFIG": str(_toml(tmp_path, toml_text))}
    res = _run(tmp_path, *args, **env)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert named in lines[0]
    assert "Traceback" not in res.stderr


def test_bad_value_in_process_names_the_setting() -> None:
    with pytest.raises(ConfigError) as caught:
        load("peer", {"bootstrap": [ENTRY]}, {"DHTSIGNAL_RPC_RETRIES": "-1"})
    assert caught.value.setting == "DHTSIGNAL_RPC_RETRIES"


# -- the shipped files and the table ----------------------------------------------------------


@pytest.mark.parametrize("command", ["bootstrap", "peer"])
def test_shipped_config_loads_and_lists_every_setting(command: str) -> None:
    file = CONFIGS / f"{command}.toml"
    s = load(command, {"config": str(file)}, {"XDG_DATA_HOME": "/xdg"})
    assert s.config == file
    assert s.storage_limits() == StorageLimits()
    assert s.node_config().rpc_timeout == NodeConfig().rpc_timeout
    text = file.read_text()
    for name in config.settings_of(command):
        where = config.toml_path(name)
        if where is None:
            continue
        key = where[-1]
        assert f"\n{key} = " in text or f"\n# {key} = " in text, f"{name} missing in {file}"
        assert "Default:" in text
    if command == "peer":
        # The shared top level serves the query commands too, without the daemon's port.
        q = load("lookup", {"config": str(file)}, {})
        assert q.listen == ("0.0.0.0", 0) and q.bootstrap == s.bootstrap


def test_every_storage_limit_is_a_setting() -> None:
    for f in dataclasses.fields(StorageLimits):
        assert config.toml_path("storage_" + f.name) == ("storage", f.name)


@pytest.mark.parametrize("command", commands.NAMES)
def test_help_names_env_variables(tmp_path: Path, command: str) -> None:
    res = _run(tmp_path, command, "--help")
    assert res.returncode == 0, res.stderr
    flat = " ".join(res.stdout.split())
    assert "--log-level" in flat and "DHTSIGNAL_LOG_LEVEL" in flat  # every command has it
    for name in config.settings_of(command):
        assert config.flag_of(name) in flat and config.env_of(name) in flat
