"""Per-MAC iPXE scripts rendered from a node's boot profile, using only what the 2019 Debian iPXE has.

The 2019 build (1.0.0+git-20190125) has no `poweroff`; a script stops at the first command that fails
unless that command is followed by `||`, so every test is written `iseq A B && goto X || goto Y`.
Downloads retry in a counted loop (`clear rb_try`, then `inc rb_try`, which counts a missing setting as a
zero :int32, as src/hci/commands/nvo_cmd.c does); the UEFI build cannot hand an
initrd to Linux by itself, so each initrd is named and passed as `initrd=NAME` on the command line
(the kernel's EFI stub loads it from iPXE's file system).
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Protocol
from urllib.parse import quote, unquote, urlsplit

from domain.nodes import Node
from domain.profiles import BootProfile
from ipxe import callback_path, files_path, script_path

BOOTING_KINDS = ("deploy", "kernel", "discovery")
_TITLES = {"deploy": "the deploy environment", "kernel": "an installed kernel", "discovery": "the discovery environment"}
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class ScriptTiming:
    """How often and how patiently a script retries (seconds and counts)."""

    tries: int = 4
    retry_delay: int = 3
    poll_delay: int = 5
    fail_delay: int = 10


@dataclass(frozen=True)
class BootImages:
    """The URLs and iPXE image names a booting profile downloads, placeholders expanded."""

    kernel_url: str
    kernel_name: str
    initrds: tuple[tuple[str, str], ...]  # (url, image name)
    cmdline: str


class _Template(string.Template):
    """`@{name}` placeholders: iPXE itself uses `${name}`, which must pass through untouched."""

    delimiter = "@"


@cache
def _template(name: str) -> _Template:
    return _Template(resources.files("ipxe").joinpath("templates", name).read_text())


def expand_placeholders(text: str, *, base_url: str, mac: str, node: Node | None) -> str:
    """Replace {base}, {mac}, {node} and {callback} in a profile's kernel, initrd or command line."""
    values = {
        "{base}": base_url,
        "{mac}": mac,
        "{node}": node.name if node is not None else "",
        "{callback}": base_url + callback_path(mac),
    }
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def resolve_url(path: str, base_url: str) -> str:
    """Return the URL of a kernel or initrd: URLs as given, '/x' on the appliance, 'x' under base_url/files/."""
    if "://" in path:
        # A script line is split on white space: an unquoted space would cut the URL.
        return re.sub(r"\s", lambda m: quote(m.group()), path)
    if path.startswith("/"):
        return base_url + quote(path)
    return base_url + quote(files_path(path))


def url_path(url: str, base_url: str) -> str | None:
    """Return the decoded path of url when it points at base_url's server, else None."""
    parts = urlsplit(url)
    if parts.netloc != urlsplit(base_url).netloc:
        return None
    return unquote(parts.path)


def image_name(url: str, taken: set[str]) -> str:
    """Return an iPXE image name for url (its file name, made unique and safe for `initrd=NAME`)."""
    base = _UNSAFE_NAME.sub("_", unquote(urlsplit(url).path).rsplit("/", 1)[-1]) or "image"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    taken.add(name)
    return name


def boot_images(profile: BootProfile, node: Node | None, mac: str, base_url: str) -> BootImages:
    """Return what a deploy/kernel/discovery profile downloads for one node, placeholders expanded."""

    def expand(text: str) -> str:
        return expand_placeholders(text, base_url=base_url, mac=mac, node=node)

    kernel_url = resolve_url(expand(profile.kernel), base_url)
    taken: set[str] = set()
    kernel_name = image_name(kernel_url, taken)
    initrds = tuple((url, image_name(url, taken)) for url in (resolve_url(expand(p), base_url) for p in profile.initrds))
    # A newline in a command line would start a new script line: fold all white space to single spaces.
    cmdline = " ".join(expand(profile.cmdline).split())
    return BootImages(kernel_url=kernel_url, kernel_name=kernel_name, initrds=initrds, cmdline=cmdline)


def _echo_text(text: str) -> str:
    """Fold text to one line that `echo` prints as is (no ${...} expansion, no &&, ||, # tokens)."""
    return " ".join(re.sub(r"[$#&|]", "_", text).split())


def _who(node: Node | None, mac: str) -> str:
    return _echo_text(f"{node.name} ({mac})" if node is not None else mac)


def _fetch_block(label: str, what: str, command: str, timing: ScriptTiming) -> str:
    return _template("fetch.ipxe").substitute(
        label=label, what=what, command=command, tries=timing.tries, retry_delay=timing.retry_delay
    ).rstrip("\n")


def render_script(
    profile: BootProfile, node: Node | None, mac: str, base_url: str, *, timing: ScriptTiming = ScriptTiming(),
    local_efi: str = "",
) -> str:
    """Return the iPXE script that makes the node with this MAC do what its boot profile says (local_efi: the
    loader UEFI nodes chain to boot their disk, a path under the files or a URL; empty: back to the firmware)."""
    who = _who(node, mac)
    script_url = base_url + script_path(mac)
    if profile.kind == "local":
        chain = f"chain --autofree {resolve_url(local_efi, base_url)} || goto efi_failed" if local_efi else "goto efi_failed"
        return _template("local.ipxe").substitute(who=who, efi_chain=chain)
    if profile.kind == "none":
        return _template("none.ipxe").substitute(who=who, poll_delay=timing.poll_delay, script_url=script_url)
    if profile.kind not in BOOTING_KINDS:
        raise ValueError(f"no iPXE script for profile kind {profile.kind!r}")
    images = boot_images(profile, node, mac, base_url)
    args = " ".join([f"initrd={name}" for _, name in images.initrds] + ([images.cmdline] if images.cmdline else []))
    blocks = [_fetch_block("kernel", "kernel", f"kernel {images.kernel_url} {args}".rstrip(), timing)]
    for i, (url, name) in enumerate(images.initrds):
        blocks.append(_fetch_block(f"initrd{i}", name, f"initrd --name {name} {url}", timing))
    title = _TITLES[profile.kind] + (f" {profile.env}" if profile.env else "")
    return _template("boot.ipxe").substitute(
        kind=profile.kind,
        who=who,
        title=_echo_text(title),
        downloads="\n".join(blocks),
        kernel_name=images.kernel_name,
        tries=timing.tries,
        retry_delay=timing.retry_delay,
        fail_delay=timing.fail_delay,
        script_url=script_url,
    )


def render_unknown_script(mac: str) -> str:
    """Return the script for a MAC outside the inventory when unknown MACs are ignored: say so and exit."""
    return _template("unknown.ipxe").substitute(mac=mac)


class BootTargets(Protocol):
    """What the renderer needs to know about a MAC (the composition root answers from inventory and profiles)."""

    def node(self, mac: str) -> Node | None:
        """Return the inventory node with this MAC, or None."""

    def profile_for(self, mac: str) -> BootProfile | None:
        """Return what the MAC boots, or None for a MAC outside the inventory that is ignored."""


@dataclass(frozen=True)
class Script:
    """A rendered script and what it does: the profile kind ('unknown' for an ignored MAC) and environment."""

    text: str
    profile: str
    env: str = ""


class ScriptRenderer:
    """The one place that turns a MAC into its iPXE script, for HTTP and TFTP alike."""

    def __init__(self, targets: BootTargets, base_url: str, timing: ScriptTiming = ScriptTiming(), local_efi: str = "") -> None:
        self.targets = targets
        self.base_url = base_url
        self.timing = timing
        self.local_efi = local_efi

    def render(self, mac: str) -> Script:
        """Return the script of a (normalized) MAC from its current boot profile."""
        profile = self.targets.profile_for(mac)
        if profile is None:
            return Script(render_unknown_script(mac), "unknown")
        text = render_script(profile, self.targets.node(mac), mac, self.base_url, timing=self.timing, local_efi=self.local_efi)
        return Script(text, profile.kind, profile.env)

    def image_kind(self, mac: str, path: str) -> str | None:
        """Return 'kernel' or 'initrd' when an HTTP path is one of the images the MAC's profile boots, else None."""
        profile = self.targets.profile_for(mac)
        if profile is None or profile.kind not in BOOTING_KINDS:
            return None
        images = boot_images(profile, self.targets.node(mac), mac, self.base_url)
        if url_path(images.kernel_url, self.base_url) == path:
            return "kernel"
        if any(url_path(url, self.base_url) == path for url, _ in images.initrds):
            return "initrd"
        return None
