"""What the deploy-environment and image builds share: a Debian tree from packages (mmdebstrap), tools run on
it, and the cache slot a build fills (a work directory renamed into place only when complete)."""
from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence


class BuildError(Exception):
    """A build could not be done (a tool failed, or the tree lacks what it needs)."""


def run(argv: Sequence[str]) -> str:
    """Run a build tool; return its stdout; raise BuildError with the end of its stderr when it fails."""
    done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"{argv[0]} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-3000:]}")
    return done.stdout


def chroot(root: Path, *argv: str) -> str:
    """Run a command inside the tree (a plain PATH: the build machine's is not the tree's)."""
    return run(["chroot", str(root), "/usr/bin/env", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", *argv])


def mmdebstrap(suite: str, packages: Sequence[str], root: Path, dpkg_excludes: Sequence[str] = ()) -> None:
    """Install a minbase Debian suite plus packages into root, from this machine's apt sources; dpkg leaves out
    the paths matching dpkg_excludes (documentation, locales)."""
    run(["mmdebstrap", "--variant=minbase", "--include=" + ",".join(packages),
         *[f"--dpkgopt=path-exclude={p}" for p in dpkg_excludes], suite, str(root)])


def package_versions(root: Path) -> dict[str, str]:
    """Return {package: version} of what dpkg installed in the tree."""
    out = run(["dpkg-query", f"--admindir={root / 'var/lib/dpkg'}", "-W", "-f", "${Package} ${Version}\n"])
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def kernel_in(root: Path) -> tuple[str, Path]:
    """Return (version, path) of the one kernel under root/boot."""
    found = sorted((root / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise BuildError(f"expected one kernel in {root / 'boot'}, found {[p.name for p in found]}")
    return found[0].name.removeprefix("vmlinuz-"), found[0]


def need_root_and(tools: Sequence[str], what: str) -> None:
    """Raise BuildError unless this process is root and every tool is on PATH (./setup.sh installs them)."""
    if os.geteuid() != 0:
        raise BuildError(f"building {what} needs root (mmdebstrap into a directory, chroot)")
    for tool in tools:
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} not found (Debian package {tool}; ./setup.sh installs it)")


@contextmanager
def cache_slot(cache_dir: Path, digest: str) -> Iterator[Path]:
    """Yield an empty work directory for the build of digest; when the body ends without error it becomes
    cache_dir/digest (replacing a stale one), else it is removed: the cache never holds half a build."""
    work = cache_dir / f"{digest}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
        done = cache_dir / digest
        shutil.rmtree(done, ignore_errors=True)
        work.rename(done)
    finally:
        shutil.rmtree(work, ignore_errors=True)
