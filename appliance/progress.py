"""What `rackboot deploy` shows while a deployment runs: its log entries, as a live view or as plain lines.

The entries are those of GET /api/v1/deployments/ID/events (appliance.deploy.report.Journal): node transitions
(`what` is the node's new state: a macro-step's name, `done` or `failed`, with step, impl and reason), the start
of each macro-step (`step`, with its nodes), boot stages, reboots, retries and escalations. On a terminal the
view is a rich live display: one bar per macro-step (nodes through it out of those that entered it), the nodes
per state, the elapsed time, and each failure printed above it as it happens. Elsewhere (a pipe, a log file) it
prints one plain line per macro-step start and per failure, and the end.
"""
from __future__ import annotations

import time
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

FINAL = ("done", "failed")


class DeployProgress:
    """Follows one deployment's log entries and shows them (live on a terminal, plain lines otherwise)."""

    def __init__(self, nodes: list[str], stream: TextIO, live: bool | None = None) -> None:
        self.console = Console(file=stream, highlight=False)
        self.live_view = self.console.is_terminal if live is None else live
        self.started = time.monotonic()
        self.state: dict[str, str] = dict.fromkeys(nodes, "pending")
        self.steps: list[str] = []
        self.entered: dict[str, set[str]] = {}  # macro-step -> nodes that entered it
        self.failures: list[tuple[str, str, str, str]] = []
        self._progress = Progress(TextColumn("{task.description:<18}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                                  TextColumn("{task.fields[note]}"), console=self.console)
        self._elapsed = Progress(TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), console=self.console)
        self._summary = self._elapsed.add_task("", counts=self._counts())
        self._tasks: dict[str, Any] = {}
        self._live: Live | None = None

    def __enter__(self) -> "DeployProgress":
        if self.live_view:
            self._live = Live(Group(self._progress, self._elapsed), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._refresh()
            self._live.__exit__(None, None, None)
            self._live = None

    def feed(self, entry: dict[str, Any]) -> None:
        """Take one log entry into account (and show what it changes)."""
        what, node = str(entry.get("what", "")), str(entry.get("node") or "")
        if what == "step" and not node:
            step = str(entry.get("step", ""))
            if step and step not in self.entered:
                self.steps.append(step)
                self.entered[step] = set()
                self._tasks[step] = self._progress.add_task(step, total=0, note="")
                if not self.live_view:
                    self._line(f"{step}: {entry.get('nodes', '')}")
        elif node in self.state and (what in FINAL or what in self.entered or what == "pending"):
            previous = self.state[node]
            self.state[node] = what
            if what in self.entered:
                self.entered[what].add(node)
            if what == "failed":
                failure = (node, str(entry.get("step", "")), str(entry.get("impl", "")), str(entry.get("reason", "")))
                self.failures.append(failure)
                self._line(f"{node} failed in {failure[1]}{'/' + failure[2] if failure[2] else ''}: {failure[3]}")
            if previous != what:
                self._refresh()
        elif what == "reboot_window" and not node:
            self._line(f"reboot window {entry.get('was', '?')} -> {entry.get('limit', '?')} nodes: {entry.get('reason', '')}")
        elif what == "broadcast" and not node:
            bypassed = f", {entry['bypassed']} suspects bypassed" if entry.get("bypassed") else ""
            self._line(f"{entry.get('impl', '')} broadcast: {entry.get('ok', '?')}/{entry.get('nodes', '?')} nodes "
                       f"(arming {entry.get('arm_s', '?')} s, stream {entry.get('stream_s', '?')} s{bypassed})")
        elif what == "finished" and not self.live_view:
            self._line(f"deployment {entry.get('status', 'finished')}: {self._counts()}")

    def note(self, text: str) -> None:
        """Show one line of the client's own among the deployment's (e.g. what Ctrl-C did)."""
        self._line(text)

    def _counts(self) -> str:
        """Nodes per state, in workflow order: '3 BroadcastEnv, 12 done, 1 failed'."""
        order = ["pending", *self.steps, "done", "failed"]
        counts = {s: 0 for s in order}
        for s in self.state.values():
            counts[s] = counts.get(s, 0) + 1
        return ", ".join(f"{n} {s}" for s, n in counts.items() if n)

    def _refresh(self) -> None:
        for i, step in enumerate(self.steps):
            entered = self.entered[step]
            later = set(self.steps[i + 1:])
            through = sum(1 for n in entered if self.state[n] in later or self.state[n] == "done")
            failed = sum(1 for n in entered if self.state[n] == "failed")
            self._progress.update(self._tasks[step], total=len(entered), completed=through,
                                  note=f"{failed} failed" if failed else "")
        self._elapsed.update(self._summary, counts=self._counts())

    def _line(self, text: str) -> None:
        stamp = f"[{time.monotonic() - self.started:6.1f}s] "
        if self._live is not None:
            self._live.console.print(Text(stamp + text), soft_wrap=True)
        else:
            self.console.file.write(stamp + text + "\n")
            self.console.file.flush()
