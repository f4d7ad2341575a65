"""A small iPXE script interpreter: what a virtual node runs once it has fetched its per-MAC script.

It follows iPXE's semantics (ipxe.org/scripting, src/core/exec.c, src/core/script.c): `${var}` expansion,
`&&`/`||` chains, a line whose final status is a failure ends the script, labels and `goto`, images fetched
by `kernel`/`initrd`/`imgfetch`/`chain` and booted by `boot`. The host (the virtual firmware) supplies
downloads, DHCP and sleeping, so the interpreter itself does no I/O and is tested with a fake host.
"""
from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Protocol

SCRIPT_MAGIC = b"#!ipxe"
_VAR_RE = re.compile(r"\$\{([^}]*)\}")
MAX_NESTING = 8


class ScriptHost(Protocol):
    """What the interpreter needs from the firmware running it."""

    async def fetch(self, uri: str, purpose: str) -> bytes:
        """Download a URI (http:// or tftp://) for a command (kernel, initrd, chain, ...); raise FetchError on failure."""

    async def sleep(self, seconds: float) -> None:
        """Wait (virtual firmware time)."""

    async def dhcp(self) -> bool:
        """Configure the network again by DHCP; return success."""

    def echo(self, text: str) -> None:
        """Print to the console."""


class FetchError(Exception):
    """A download failed (connection refused, HTTP error, TFTP error, timeout)."""


@dataclass
class Image:
    """An image in iPXE's image list."""

    name: str
    uri: str
    data: bytes
    args: str = ""

    @property
    def is_script(self) -> bool:
        """Tell whether iPXE would run this image as a script."""
        return self.data.lstrip()[: len(SCRIPT_MAGIC)] == SCRIPT_MAGIC


@dataclass(frozen=True)
class Outcome:
    """How a script ended.

    kind: "kernel" (an image was booted: kernel, initrds, cmdline), "local" (sanboot of the local disk or exit
    back to the firmware's next boot device), "reboot", "halt" (waits forever: shell, prompt without timeout),
    "failed" (a command failed: iPXE returns to the firmware).
    """

    kind: str
    kernel: Image | None = None
    initrds: tuple[Image, ...] = ()
    cmdline: str = ""
    error: str = ""
    line: int = 0


class _Boot(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.kind)
        self.outcome = outcome


class _Replace(Exception):
    """`chain --replace` of a script: the running script stack is replaced by the new one."""

    def __init__(self, image: Image) -> None:
        super().__init__(image.uri)
        self.image = image


@dataclass
class Interpreter:
    """One iPXE instance: settings, image list and the script stack."""

    host: ScriptHost
    settings: dict[str, str] = field(default_factory=dict)
    images: list[Image] = field(default_factory=list)
    selected: Image | None = None
    commands_run: int = 0
    max_commands: int = 100000  # a script looping forever is cut here (real iPXE would spin until power-off)

    async def run_script(self, data: bytes, uri: str) -> Outcome:
        """Run a script image to its end; return how the boot ends."""
        while True:
            try:
                await self._execute(data.decode("utf-8", "replace"), uri, depth=0)
            except _Boot as boot:
                return boot.outcome
            except _Replace as replace:
                data, uri = replace.image.data, replace.image.uri
                continue
            # A script that runs off its end without booting returns to iPXE, which returns to the firmware.
            return Outcome("local", error="script ended without booting")

    def expand(self, text: str) -> str:
        """Expand ${name} and ${name:type} settings (unset ones expand to nothing)."""
        def one(m: re.Match[str]) -> str:
            name, _, kind = m.group(1).partition(":")
            value = self.settings.get(name)
            if value is None and "/" in name:
                value = self.settings.get(name.split("/", 1)[1])
            if value is None:
                return ""
            if kind == "hexhyp":
                return value.replace(":", "-")
            if kind == "hexraw":
                return value.replace(":", "")
            if kind == "uristring":
                return urllib.parse.quote(value, safe="")
            return value
        # iPXE expands innermost first, so ${a${b}} works; two rounds cover that case.
        for _ in range(2):
            text = _VAR_RE.sub(one, text)
        return text

    async def _execute(self, text: str, uri: str, depth: int) -> None:
        if depth > MAX_NESTING:
            raise _Boot(Outcome("failed", error="too many nested scripts"))
        lines = text.splitlines()
        labels = {ln.strip()[1:].split()[0]: i for i, ln in enumerate(lines) if ln.strip().startswith(":") and len(ln.strip()) > 1}
        pc = 0
        while pc < len(lines):
            line = lines[pc]
            pc += 1
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.startswith(":"):
                continue
            self.commands_run += 1
            if self.commands_run > self.max_commands:
                raise _Boot(Outcome("halt", error="script loops forever", line=pc))
            ok, jump = await self._line(stripped, uri, depth, pc)
            if jump is not None:
                if jump not in labels:
                    raise _Boot(Outcome("failed", error=f"goto: no such label {jump!r}", line=pc))
                pc = labels[jump] + 1
                continue
            if not ok:
                # script.c: a line whose final status is a failure terminates the script.
                raise _Boot(Outcome("failed", error=f"line {pc}: {stripped}", line=pc))

    async def _line(self, line: str, uri: str, depth: int, lineno: int) -> tuple[bool, str | None]:
        """Run one line of &&/|| chained commands; return (status, goto target)."""
        parts = re.split(r"\s*(\|\||&&)\s*", line)
        ok, run_next = True, True
        for i in range(0, len(parts), 2):
            command = parts[i]
            if run_next and command:
                ok, jump = await self._command(command, uri, depth, lineno)
                if jump is not None:
                    return True, jump
            op = parts[i + 1] if i + 1 < len(parts) else None
            if op is None:
                break
            # exec.c: after "||" the next command runs only if the last one failed, after "&&" only if it succeeded.
            run_next = (not ok) if op == "||" else ok
        return ok, None

    async def _command(self, command: str, uri: str, depth: int, lineno: int) -> tuple[bool, str | None]:
        argv = self.expand(command).split()
        if not argv:
            return True, None
        name, args = argv[0], argv[1:]
        if name in ("set", "echo"):
            flags, plain = {}, args
        else:
            flags, plain = parse_options(args)
        if name == "goto":
            return (True, plain[0]) if plain else (False, None)
        if name in ("set",):
            if not plain:
                return False, None
            self.settings[plain[0]] = " ".join(plain[1:])
            return True, None
        if name == "clear":
            for key in plain:
                self.settings.pop(key, None)
            return True, None
        if name == "inc":
            if not plain:
                return False, None
            try:
                value = int(self.settings.get(plain[0]) or "0") + (int(plain[1]) if len(plain) > 1 else 1)
            except ValueError:
                return False, None
            self.settings[plain[0]] = str(value)
            return True, None
        if name == "isset":
            return bool(plain), None
        if name == "iseq":
            return len(plain) == 2 and plain[0] == plain[1], None
        if name == "echo":
            self.host.echo(" ".join(a for a in args if a != "-n"))
            return True, None
        if name == "sleep":
            try:
                await self.host.sleep(float(plain[0]) if plain else 0.0)
            except ValueError:
                return False, None
            return True, None
        if name == "prompt":
            timeout = flags.get("timeout")
            if timeout is None:
                raise _Boot(Outcome("halt", error="prompt waits for a key", line=lineno))
            await self.host.sleep(int(timeout) / 1000)
            return False, None  # nobody presses a key: the prompt fails after its timeout
        if name in ("dhcp", "ifconf"):
            return await self.host.dhcp(), None
        if name in ("ifopen", "ifclose", "ifstat", "route", "ntp", "imgstat", "imgverify", "imgtrust", "cpair", "nslookup"):
            return True, None
        if name in ("kernel", "imgselect", "imgload", "load"):
            image = await self._fetch_image(plain, flags, uri, name)
            if image is None:
                return False, None
            self.selected = image
            return True, None
        if name in ("initrd", "imgfetch", "module", "fetch"):
            return (await self._fetch_image(plain, flags, uri, name)) is not None, None
        if name == "imgargs":
            image = self._image(plain[0]) if plain else None
            if image is None:
                return False, None
            image.args = " ".join(plain[1:])
            return True, None
        if name == "imgfree":
            if plain:
                self.images = [im for im in self.images if im.name != plain[0]]
            else:
                self.images.clear()
                self.selected = None
            return True, None
        if name in ("boot", "imgexec", "exec"):
            image = self._image(plain[0]) if plain else (self.selected or (self.images[-1] if self.images else None))
            if image is None:
                return False, None
            if len(plain) > 1:
                image.args = " ".join(plain[1:])
            return await self._exec_image(image, depth, replace=True, lineno=lineno)
        if name == "chain":
            image = await self._fetch_image(plain, flags, uri, name)
            if image is None:
                return False, None
            return await self._exec_image(image, depth, replace="replace" in flags, lineno=lineno)
        if name == "sanboot":
            if plain:
                raise _Boot(Outcome("failed", error=f"sanboot of {plain[0]} is not emulated", line=lineno))
            raise _Boot(Outcome("local", line=lineno))
        if name == "exit":
            raise _Boot(Outcome("local", error="exit", line=lineno))
        if name == "reboot":
            raise _Boot(Outcome("reboot", line=lineno))
        if name in ("shell", "login"):
            raise _Boot(Outcome("halt", error=f"{name} waits at the console", line=lineno))
        # Anything else: iPXE prints "<name>: command not found" (e.g. `poweroff` in the 2019 Debian build).
        self.host.echo(f"{name}: command not found")
        return False, None

    def _image(self, name: str) -> Image | None:
        for image in reversed(self.images):
            if image.name == name:
                return image
        return None

    async def _fetch_image(self, plain: list[str], flags: dict[str, str], base: str, purpose: str) -> Image | None:
        if not plain:
            return None
        uri = urllib.parse.urljoin(base, plain[0]) if base else plain[0]
        try:
            data = await self.host.fetch(uri, purpose)
        except FetchError as exc:
            self.host.echo(f"Could not fetch {uri}: {exc}")
            return None
        name = flags.get("name") or uri.rsplit("/", 1)[-1].split("?")[0]
        image = Image(name=name, uri=uri, data=data, args=" ".join(plain[1:]))
        self.images.append(image)
        return image

    async def _exec_image(self, image: Image, depth: int, replace: bool, lineno: int) -> tuple[bool, str | None]:
        if image.is_script:
            if replace:
                raise _Replace(image)
            await self._execute(image.data.decode("utf-8", "replace"), image.uri, depth + 1)
            return True, None
        initrds = tuple(im for im in self.images if im is not image and not im.is_script)
        raise _Boot(Outcome("kernel", kernel=image, initrds=initrds, cmdline=image.args, line=lineno))


# iPXE's getopt-style options (src/core/parseopt.c users): those that take a value, and short aliases.
_VALUE_OPTIONS = {"name", "timeout", "key", "drive", "filename", "extra", "configurator"}
_SHORT = {"n": "name", "t": "timeout", "k": "key", "d": "drive", "c": "configurator", "a": "autofree", "r": "replace"}


def parse_options(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split command arguments into options (--name X, -n X, --name=X, --replace) and plain arguments."""
    opts: dict[str, str] = {}
    plain: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and len(a) > 1 and not plain:
            key, eq, value = a.lstrip("-").partition("=")
            key = _SHORT.get(key, key) if not a.startswith("--") else key
            if eq:
                opts[key] = value
            elif key in _VALUE_OPTIONS and i + 1 < len(args):
                opts[key] = args[i + 1]
                i += 1
            else:
                opts[key] = ""
        else:
            plain.append(a)
        i += 1
    return opts, plain
