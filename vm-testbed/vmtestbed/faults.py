"""Fault injection: which nodes misbehave and how, drawn reproducibly from a seed (pure).

SPEC is a comma-separated list (fractions are of the testbed's nodes; counts are rounded):
  noreturn=F        F of the nodes never come back from a reboot (their first power-on works)
  posthang=F        F of the nodes hang in POST on their first power-on (a power cycle cures it)
  bmcdead=F         F of the BMCs never answer
  bmcslow=F[:S]     F of the BMCs answer every command S seconds late (default 3)
  loss=P[:F]        the firmware of F of the nodes (default all) loses P of its DHCP/TFTP packets
  die=F@WHEN        F of the nodes die (hang, powered on, silent) when they reach a boot stage
                    (dhcp, tftp, ipxe, script, kernel, initrd, os, callback), once their deploy agent has
                    received the first MiB of a broadcast (broadcast), or WHEN seconds after power-on
Example: --faults "loss=0.05,posthang=0.1,bmcdead=0.02,die=0.05@tftp" --seed 7
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

STAGES = ("dhcp", "tftp", "ipxe", "script", "kernel", "initrd", "os", "callback", "broadcast")


@dataclass(frozen=True)
class NodeFaults:
    """The faults of one node (all off by default)."""

    noreturn: bool = False
    posthang: bool = False
    bmc_dead: bool = False
    bmc_slow_s: float = 0.0
    loss: float = 0.0
    die_stage: str = ""
    die_after_s: float = 0.0

    @property
    def any(self) -> bool:
        """Tell whether this node has at least one fault."""
        return self != NodeFaults()

    def describe(self) -> str:
        """Return a short text for status output."""
        parts = []
        if self.noreturn:
            parts.append("noreturn")
        if self.posthang:
            parts.append("posthang")
        if self.bmc_dead:
            parts.append("bmcdead")
        if self.bmc_slow_s:
            parts.append(f"bmcslow:{self.bmc_slow_s:g}s")
        if self.loss:
            parts.append(f"loss:{self.loss:g}")
        if self.die_stage:
            parts.append(f"die@{self.die_stage}")
        if self.die_after_s:
            parts.append(f"die@{self.die_after_s:g}s")
        return ",".join(parts)


@dataclass(frozen=True)
class FaultSpec:
    """A parsed --faults SPEC."""

    noreturn: float = 0.0
    posthang: float = 0.0
    bmcdead: float = 0.0
    bmcslow: float = 0.0
    bmcslow_s: float = 3.0
    loss: float = 0.0
    loss_fraction: float = 1.0
    die: float = 0.0
    die_when: str = ""
    text: str = field(default="", compare=False)


def _fraction(key: str, text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}={text}: expected a fraction between 0 and 1")
    return value


def parse_faults(text: str) -> FaultSpec:
    """Parse a --faults SPEC; raise ValueError with the offending item."""
    values: dict[str, object] = {"text": text}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"fault {item!r}: expected KIND=VALUE")
        try:
            if key in ("noreturn", "posthang", "bmcdead"):
                values[key] = _fraction(key, value)
            elif key == "bmcslow":
                frac, _, secs = value.partition(":")
                values["bmcslow"] = _fraction(key, frac)
                if secs:
                    values["bmcslow_s"] = float(secs)
            elif key == "loss":
                prob, _, frac = value.partition(":")
                values["loss"] = _fraction(key, prob)
                if frac:
                    values["loss_fraction"] = _fraction(key, frac)
            elif key == "die":
                frac, at, when = value.partition("@")
                if not at or not when:
                    raise ValueError(f"die={value}: expected FRACTION@STAGE or FRACTION@SECONDS")
                if when not in STAGES:
                    float(when.rstrip("s"))
                values["die"] = _fraction(key, frac)
                values["die_when"] = when
            else:
                raise ValueError(f"unknown fault kind {key!r} (expected noreturn, posthang, bmcdead, bmcslow, loss, die)")
        except ValueError as exc:
            raise ValueError(f"--faults {item!r}: {exc}") from None
    return FaultSpec(**values)  # type: ignore[arg-type]


def assign_faults(spec: FaultSpec, node_names: list[str], seed: int) -> dict[str, NodeFaults]:
    """Pick the faulty nodes of each kind; the same spec, names and seed always give the same answer."""
    rng = random.Random(seed)
    n = len(node_names)

    def pick(fraction: float) -> set[str]:
        count = round(fraction * n)
        return set(rng.sample(node_names, count)) if count else set()

    noreturn = pick(spec.noreturn)
    posthang = pick(spec.posthang)
    bmcdead = pick(spec.bmcdead)
    bmcslow = pick(spec.bmcslow)
    lossy = pick(spec.loss_fraction) if spec.loss else set()
    dying = pick(spec.die)
    die_stage = spec.die_when if spec.die_when in STAGES else ""
    die_after = float(spec.die_when.rstrip("s")) if spec.die_when and not die_stage else 0.0
    out = {}
    for name in node_names:
        out[name] = NodeFaults(
            noreturn=name in noreturn,
            posthang=name in posthang,
            bmc_dead=name in bmcdead,
            bmc_slow_s=spec.bmcslow_s if name in bmcslow else 0.0,
            loss=spec.loss if name in lossy else 0.0,
            die_stage=die_stage if name in dying else "",
            die_after_s=die_after if name in dying else 0.0,
        )
    return out


def parse_post_delay(text: str) -> tuple[str, float, float]:
    """Parse --post-s: "S" (fixed), "A-B" (uniform), "exp:M" (exponential of mean M), "normal:M,SD"."""
    t = text.strip()
    try:
        if t.startswith("exp:"):
            return ("exp", float(t[4:]), 0.0)
        if t.startswith("normal:"):
            mean, _, sd = t[7:].partition(",")
            return ("normal", float(mean), float(sd or 0))
        if "-" in t[1:]:
            a, _, b = t.partition("-") if not t.startswith("-") else ("", "", "")
            lo, hi = float(a), float(b)
            if hi < lo:
                raise ValueError("the range ends before it starts")
            return ("uniform", lo, hi)
        return ("fixed", float(t), 0.0)
    except ValueError as exc:
        raise ValueError(f"--post-s {text!r}: expected S, A-B, exp:MEAN or normal:MEAN,SD ({exc})") from None


def draw_post_delay(dist: tuple[str, float, float], rng: random.Random) -> float:
    """Draw one POST duration (never negative)."""
    kind, a, b = dist
    if kind == "uniform":
        return rng.uniform(a, b)
    if kind == "exp":
        return rng.expovariate(1 / a) if a > 0 else 0.0
    if kind == "normal":
        return max(0.0, rng.gauss(a, b))
    return max(0.0, a)
