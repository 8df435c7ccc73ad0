"""CLI wiring: exit statuses and help, without services."""

from __future__ import annotations

from orchard.app.cli import main
from orchard.core.errors import ExitStatus


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == ExitStatus.OK
    out = capsys.readouterr().out
    for name in ("stack", "upload", "train", "infer", "features", "search", "demo"):
        assert name in out


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["no-such-command"]) == ExitStatus.USAGE


def test_status_of_a_stack_that_never_ran_is_unavailable(tmp_path, capsys):
    assert main(["--home", str(tmp_path), "stack", "status", "--json"]) == ExitStatus.UNAVAILABLE
    assert '"health": "down"' in capsys.readouterr().out


def test_logs_of_an_unknown_service_is_a_config_error(tmp_path):
    assert main(["--home", str(tmp_path), "stack", "logs", "nope"]) == ExitStatus.CONFIG
