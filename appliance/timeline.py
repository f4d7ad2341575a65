"""A deployment's per-node timeline as an SVG Gantt chart, from its persisted node transitions and the nodes' boot
records (pure: text out).

One row per node. Its upper lane has one bar per stay in a state (a macro-step, with the implementation that ran
it: a retry or a fallback implementation starts a new bar), coloured by macro-step; a failed node ends with a red
mark whose tooltip is the reason. Its lower lane has the boot stages (`appliance/bootstages.py`: DHCP, NBP,
script, kernel/initrd, agent up, image written, installed system up), one bar per stage. Time runs left to right
from the deployment's first transition. `rackboot stats --deployment ID --svg FILE` writes it, and
`GET /api/v1/deployments/ID/timeline` serves it to the dashboard.
"""
from __future__ import annotations

import re
from typing import Any
from xml.sax.saxutils import escape

from appliance.bootstages import STAGES, Segment, segments as boot_segments

COLOURS = {"SetDeploymentEnv": "#4e79a7", "BroadcastEnv": "#f28e2b", "BootNewEnv": "#59a14f", "Reboot": "#76b7b2"}
OTHER = "#bab0ac"
ROW, BAR, LANE, LEFT, RIGHT, TOP, WIDTH = 30, 12, 9, 110, 20, 62, 900  # LANE: the boot-stage bars
FINAL = ("done", "failed")


def _segments(transitions: list[dict[str, Any]]) -> dict[str, list[tuple[float, float, str, str]]]:
    """Per node: (start, end, state, impl) stays, oldest first; a final state is a zero-length stay."""
    by_node: dict[str, list[dict[str, Any]]] = {}
    for t in sorted(transitions, key=lambda t: t["ts"]):
        by_node.setdefault(t["node"], []).append(t)
    out: dict[str, list[tuple[float, float, str, str]]] = {}
    for node, moves in by_node.items():
        stays = []
        for here, after in zip(moves, moves[1:] + [None]):
            end = after["ts"] if after is not None else here["ts"]
            stays.append((float(here["ts"]), float(end), str(here["to_state"]), str(here.get("impl") or "")))
        out[node] = stays
    return out


def gantt_svg(transitions: list[dict[str, Any]], title: str = "", records: list[dict[str, Any]] | None = None) -> str:
    """The SVG chart of a deployment's transitions (node, ts, to_state, impl, reason) and boot records (node, kind, ts)."""
    segments = _segments(transitions)
    if not segments:
        return _svg(WIDTH, TOP + ROW, [f'<text x="{LEFT}" y="{TOP}">no transitions</text>'], title)
    stages = boot_segments(transitions, records or [])
    start = min(s[0] for stays in segments.values() for s in stays)
    end = max([s[1] for stays in segments.values() for s in stays] + [g.end for row in stages.values() for g in row])
    span = max(end - start, 1e-3)
    scale = (WIDTH - LEFT - RIGHT) / span
    reasons = {t["node"]: t.get("reason", "") for t in transitions if t["to_state"] == "failed"}
    body: list[str] = []
    for i, (node, stays) in enumerate(sorted(segments.items(), key=lambda kv: _natural(kv[0]))):
        y = TOP + i * ROW
        body.append(f'<text x="{LEFT - 6}" y="{y + BAR - 2}" text-anchor="end">{escape(node)}</text>')
        for t0, t1, state, impl in stays:
            x = LEFT + (t0 - start) * scale
            if state == "failed":
                tip = escape(f"{node} failed: {reasons.get(node, '')}")
                body.append(f'<rect class="failed" x="{x:.1f}" y="{y}" width="4" height="{BAR}" fill="#e15759">'
                            f"<title>{tip}</title></rect>")
                continue
            if state in FINAL or state == "pending":
                continue
            w = max((t1 - t0) * scale, 1.0)
            tip = escape(f"{node} {state}{'/' + impl if impl else ''}: {t1 - t0:.1f} s")
            body.append(f'<rect class="stay" data-state="{escape(state)}" x="{x:.1f}" y="{y}" width="{w:.1f}" '
                        f'height="{BAR}" fill="{COLOURS.get(state, OTHER)}"><title>{tip}</title></rect>')
        body += [_stage_bar(g, LEFT + (g.start - start) * scale, y + BAR + 2, scale, start) for g in stages.get(node, [])]
    height = TOP + len(segments) * ROW + 30
    body += _axis(span, scale, height - 24)
    body += _legend()
    return _svg(WIDTH, height, body, title)


def _stage_bar(g: Segment, x: float, y: float, scale: float, t0: float) -> str:
    """One boot stage of a node: a bar in the row's lower lane, its tooltip when it began and how long it lasted."""
    w = max((g.end - g.start) * scale, 2.0)
    tip = escape(f"{g.node} {g.label}: at {g.start - t0:.1f} s" + (f", {g.end - g.start:.1f} s" if g.end > g.start else ""))
    return (f'<rect class="stage" data-node="{escape(g.node)}" data-stage="{g.stage}" x="{x:.1f}" y="{y}" '
            f'width="{w:.1f}" height="{LANE}" fill="{STAGES[g.stage][1]}"><title>{tip}</title></rect>')


def _axis(span: float, scale: float, y: float) -> list[str]:
    step = next(s for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1200, 3600, 1e9) if span / s <= 10)
    out = [f'<line x1="{LEFT}" y1="{y}" x2="{LEFT + span * scale:.1f}" y2="{y}" stroke="#666"/>']
    t = 0.0
    while t <= span + 1e-9:
        x = LEFT + t * scale
        out.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 4}" stroke="#666"/>')
        out.append(f'<text x="{x:.1f}" y="{y + 16}" text-anchor="middle">{t:g} s</text>')
        t += step
    return out


def _legend() -> list[str]:
    out: list[str] = []
    lines = [[*COLOURS.items(), ("failed", "#e15759")], [(label, colour) for label, colour in STAGES.values()]]
    for y, items in zip((12, 30), lines):
        x = 10
        for name, colour in items:
            out.append(f'<rect class="legend" x="{x}" y="{y}" width="10" height="10" fill="{colour}"/>')
            out.append(f'<text x="{x + 14}" y="{y + 9}">{escape(name)}</text>')
            x += 16 + 6 * len(name) + 12
    return out


def _svg(width: int, height: float, body: list[str], title: str) -> str:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0f}" '
            f'viewBox="0 0 {width} {height:.0f}" font-family="sans-serif" font-size="11">')
    caption = f"<title>{escape(title)}</title>" if title else ""
    return "\n".join([head, caption, *body, "</svg>"]) + "\n"


def _natural(name: str) -> tuple[Any, ...]:
    """node-2 before node-10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))
