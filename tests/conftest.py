"""Fixtures shared by the unit tests; the fakes themselves are in fakes.py (tests/e2e has a conftest module of its own)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import asyncssh
import pytest

from fakes import FakeClock


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the tests marked pyghmi_client first: they drive pyghmi's IPMI client in this process, and the e2e
    tests' in-process virtual BMCs patch pyghmi's module-level session code for many BMCs (vmtestbed/bmc.py),
    after which the client's answers are never matched ("no answer" from every BMC, seen in a full run)."""
    items.sort(key=lambda item: item.get_closest_marker("pyghmi_client") is None)  # stable: the rest keep their order


@pytest.fixture
def fake_clock() -> FakeClock:
    """A clock that moves only when the test advances it."""
    return FakeClock()


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """Make block devices: loop devices over sparse files (partitions shown, losetup -P); unmounted and detached after."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    made: list[str] = []

    def make(size_mib: int) -> str:
        image = tmp_path / f"disk{len(made)}.img"
        with open(image, "wb") as f:
            f.truncate(size_mib << 20)
        done = subprocess.run(["losetup", "--show", "-f", "-P", str(image)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"no loop device: {done.stderr.strip()}")
        made.append(done.stdout.strip())
        return made[-1]

    try:
        yield make
    finally:
        for device in made:
            for line in reversed(Path("/proc/mounts").read_text().splitlines()):
                if line.split()[0].startswith(device):
                    subprocess.run(["umount", line.split()[1]], capture_output=True)
            subprocess.run(["losetup", "-d", device], capture_output=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[asyncssh.SSHKey, str]:
    """The appliance's deploy key, and the tree key file the agents use between themselves."""
    deploy = asyncssh.generate_private_key("ssh-ed25519")
    tree = asyncssh.generate_private_key("ssh-ed25519")
    path = tmp_path_factory.mktemp("keys") / "tree_key"
    tree.write_private_key(str(path))
    return deploy, str(path)
