"""The command table (:mod:`dhtsignal.commands`) is the one list the CLI and the settings read."""

from __future__ import annotations

import pytest

from dhtsignal import cli, commands


def test_every_command_has_code_help_and_settings() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # argparse's own table
    choices = getattr(sub, "choices", None)
    assert choices is not None
    assert tuple(choices) == commands.NAMES
    assert set(cli._HANDLERS) == set(commands.NAMES)
    for command in commands.COMMANDS:
        assert command.summary and command.description
        sub_parser = choices[command.name]
        dests = [a.dest for a in sub_parser._actions]
        for arg in command.positionals:
            assert arg.dest in dests


def test_groups_follow_the_roles() -> None:
    assert {"bootstrap", "peer"} == commands.DAEMONS
    assert {"peers", "lookup"} == commands.QUERIES
    assert {"ping", "send", "chat"} == commands.DIALERS
    assert {"ping", "send", "chat", "peer"} == commands.SESSIONS
    assert "demo" not in commands.NODES and "status" in commands.NODES


def test_attaching_code_to_an_unknown_command_is_refused() -> None:
    with pytest.raises(ValueError, match="no command 'nonesuch'"):
        cli._runs("nonesuch")


def test_positionals_come_from_the_table() -> None:
    ns = cli.build_parser().parse_args(["send", "bob", "hello there"])
    assert (ns.command, ns.target_id, ns.text) == ("send", "bob", "hello there")
