"""Boot profiles: what a node boots next (deploy kernel, local disk, an installed kernel, nothing)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

PROFILE_KINDS = ("none", "local", "deploy", "kernel", "discovery")


@dataclass(frozen=True)
class BootProfile:
    """What the per-MAC iPXE script makes a node do.

    kernel/initrds are URLs or paths under the HTTP files root; cmdline is passed to the kernel.
    """

    kind: str = "none"
    kernel: str = ""
    initrds: tuple[str, ...] = ()
    cmdline: str = ""
    env: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in PROFILE_KINDS:
            raise ValueError(f"unknown boot profile kind {self.kind!r}")
        if self.kind in ("deploy", "kernel", "discovery") and not self.kernel:
            raise ValueError(f"a {self.kind!r} profile needs a kernel")

    def to_json(self) -> dict[str, object]:
        """Return a JSON-ready dict."""
        d = asdict(self)
        d["initrds"] = list(self.initrds)
        return d

    @classmethod
    def from_json(cls, data: dict[str, object]) -> "BootProfile":
        """Build a profile from its JSON form; raise ValueError on bad input."""
        return cls(
            kind=str(data.get("kind", "none")),
            kernel=str(data.get("kernel", "")),
            initrds=tuple(str(x) for x in data.get("initrds", []) or []),  # type: ignore[union-attr]
            cmdline=str(data.get("cmdline", "")),
            env=str(data.get("env", "")),
            params={str(k): str(v) for k, v in (data.get("params") or {}).items()},  # type: ignore[union-attr]
        )
