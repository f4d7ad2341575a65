"""Every client command prints JSON with --json and readable text without it, against a real `rackboot serve`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from test_appliance import free_port, write_config


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Path]:
    """A `rackboot serve` on loopback (DHCP off); yields its config."""
    config = write_config(tmp_path, free_port())
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "state" / "serve.ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.1)
        yield config
    finally:
        proc.terminate()
        proc.wait(15)


def cli(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run the rackboot CLI as the admin of that appliance."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACKBOOT_")}
    return subprocess.run([sys.executable, "-m", "appliance.cli", *argv, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_json_everywhere_and_text_otherwise(served: Path) -> None:
    commands = [("user", "add", "bob"), ("user", "grant", "bob", "-m", "node-1"), ("user", "list"),
                ("user", "revoke", "bob", "-m", "node-1"), ("user", "rm", "bob"), ("env", "list"), ("deployments",),
                ("stats",)]
    # What puts things back between the JSON run and the text run of a command that changes them.
    undo = {("user", "add"): ("user", "rm", "bob"), ("user", "rm"): ("user", "add", "bob"),
            ("user", "revoke"): ("user", "grant", "bob", "-m", "node-1")}
    for argv in commands:
        as_json = cli(served, *argv, "--json")
        assert as_json.returncode == 0, (argv, as_json.stderr)
        json.loads(as_json.stdout)  # one JSON document, nothing else on stdout
        if argv[:2] in undo:
            cli(served, *undo[argv[:2]])
        text = cli(served, *argv)
        assert text.returncode == 0, (argv, text.stderr)
        if text.stdout.strip() not in ("", "[]"):
            with pytest.raises(ValueError):
                json.loads(text.stdout)  # readable text, not JSON
    added = json.loads(cli(served, "user", "add", "carol", "--json").stdout)
    assert set(added) >= {"name", "token"} and added["name"] == "carol"
    assert cli(served, "user", "add", "dave").stdout.strip().count("\n") == 0  # the token alone, for scripts


def test_usage_errors_exit_64_never_2() -> None:
    """2 means "some nodes failed": a wrong command line must not look like it."""
    for argv in (["deploy", "-e", "x", "--bogus"], ["env", "frob"], ["deploy"], ["testbed", "up", "--nodes", "1"], []):
        done = subprocess.run([sys.executable, "-m", "appliance.cli", *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 64 and "error:" in done.stderr, (argv, done.returncode, done.stderr)
