"""Command lines: --help answers before torch is imported, and documents every option."""

from __future__ import annotations

import subprocess
import sys

import pytest

from escarda_lab import arguments
from tests.conftest import ROOT

COMMANDS = sorted(arguments.ARGUMENTS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_does_not_import_torch(command):
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['escarda_lab.{command}', '--help']\n"
        "try:\n"
        f"    runpy.run_module('escarda_lab.{command}', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
        "print('TORCH' if 'torch' in sys.modules else 'LIGHT')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip().endswith("LIGHT") and f"python -m escarda_lab.{command}" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_shows_its_default(command):
    p = arguments.parser(command)
    text = p.format_help()
    for action in p._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{command} {action.dest} has no help"
        if action.option_strings and not action.required:
            assert "(default:" in p._get_formatter()._format_action(action) or action.default is None, action.dest
    assert arguments.DESCRIPTIONS[command].split()[0] in text


@pytest.mark.parametrize("command", COMMANDS)
def test_each_cli_parses_with_its_own_parser(command):
    """The module's main builds its parser from escarda_lab.arguments (one definition)."""
    source = (ROOT / "escarda_lab" / f"{command}.py").read_text()
    assert f'arguments.parser("{command}")' in source and "ArgumentParser(" not in source
