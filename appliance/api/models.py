"""Request and response models of /api/v1 (pydantic v2): bodies are validated once, schemas feed the OpenAPI document.

Request models forbid unknown fields, so a misspelt field is a 400 naming it. Query models ignore unknown
parameters (a client may pass its token as ?token=). Models of what the deployment controller reports
allow extra fields: the controller owns those shapes and may add to them.
"""
from __future__ import annotations

import re
from typing import Any, Literal

import asyncssh
from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator

from appliance.auth import PERMS
from appliance.deploy.power import POWER_OPS
from domain.profiles import PROFILE_KINDS, BootProfile

# Should a profile's cmdline carry a node token (an operator's own profile; deployments put none there), it is never served.
_TOKEN_IN_CMDLINE = re.compile(r"(rackboot\.token=)\S*")
REDACTED = "***"

ProfileKind = Literal[PROFILE_KINDS]  # type: ignore[valid-type]
PowerOp = Literal[POWER_OPS]  # type: ignore[valid-type]
Perm = Literal[PERMS]  # type: ignore[valid-type]


def redact_cmdline(cmdline: str) -> str:
    """Return a kernel cmdline with the value of rackboot.token= replaced by ***."""
    return _TOKEN_IN_CMDLINE.sub(rf"\g<1>{REDACTED}", cmdline)


class Request(BaseModel):
    """A JSON request body: unknown fields are refused, and so are values of another JSON type than the
    document says (strict: `"admin": 0` is not a boolean, `"fanout": "4"` not an integer)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Query(BaseModel):
    """Query parameters: unknown ones are ignored."""

    model_config = ConfigDict(extra="ignore")


class Answer(BaseModel):
    """A JSON response body."""


class Reported(Answer):
    """A response shape the deployment controller owns: fields it adds pass through."""

    model_config = ConfigDict(extra="allow")


class NodeSetBody(Request):
    """A request on a node set."""

    nodes: str = Field(min_length=1, description="folded node set, e.g. node-[1-40]")


# -- requests -------------------------------------------------------------------------------------------


class DeployRequest(NodeSetBody):
    """Start a deployment."""

    env: str = Field(min_length=1, description="NAME or NAME:VERSION")
    broadcast: Literal["chain", "tree", "star"] = "chain"
    force: bool = Field(False, description="take nodes from a running deployment")
    steps: str | None = Field(None, description="override implementations, e.g. 'BroadcastEnv|star:1:900'")
    ssh_keys: list[str] = Field(default_factory=list, max_length=16,
                                description="OpenSSH public keys for root's authorized_keys on the installed systems")

    @field_validator("ssh_keys")
    @classmethod
    def _public_keys(cls, keys: list[str]) -> list[str]:
        """Each key must be one OpenSSH public key line (asyncssh parses it)."""
        out = []
        for key in keys:
            line = key.strip()
            if "\n" in line or "'" in line or len(line) > 16384:
                raise ValueError("one OpenSSH public key per item, on one line")
            try:
                asyncssh.import_public_key(line)
            except (asyncssh.KeyImportError, ValueError) as exc:
                raise ValueError(f"not an OpenSSH public key: {exc}") from None
            out.append(line)
        return out


class PowerRequest(NodeSetBody):
    """Power operation on nodes."""

    op: PowerOp
    force: bool = False


class RebootRequest(NodeSetBody):
    """Reboot nodes, optionally into deploy, local or an environment."""

    to: str = Field("", description="'' (as they are), deploy, local or ENV[:VERSION]")
    level: Literal["soft", "hard", "very_hard"] = "soft"
    force: bool = False


class ExecRequest(NodeSetBody):
    """Run a command on nodes through the agents' tree."""

    command: str = Field(min_length=1)
    fanout: int = Field(16, ge=1)
    timeout: float = Field(60.0, gt=0, description="per-node command timeout (s)")


class UserAddRequest(Request):
    """Add a user."""

    name: str = Field(min_length=1)
    admin: bool = False


class GrantRequest(NodeSetBody):
    """Give a user rights on a node set."""

    perms: list[Perm]


class RevokeRequest(NodeSetBody):
    """Take a user's rights on a node set away (the set as it was granted)."""


class Revoked(Answer):
    """Rights taken away."""

    user: str
    nodes: str
    revoked: bool


class ProfileRequest(Request):
    """A boot profile: what a node boots next."""

    kind: ProfileKind = "none"
    kernel: str = ""
    initrds: list[str] = []
    cmdline: str = ""
    env: str = ""
    params: dict[str, str] = {}

    @model_validator(mode="after")
    def _needs_kernel(self) -> "ProfileRequest":
        if self.kind in ("deploy", "kernel", "discovery") and not self.kernel:
            raise ValueError(f"a {self.kind!r} profile needs a kernel")
        return self

    def to_profile(self) -> BootProfile:
        """Return the domain BootProfile."""
        return BootProfile(kind=self.kind, kernel=self.kernel, initrds=tuple(self.initrds), cmdline=self.cmdline,
                           env=self.env, params=dict(self.params))


# -- queries --------------------------------------------------------------------------------------------


class NodesQuery(Query):
    """How many of each node's last events to show."""

    events: int | None = Field(None, ge=0, description="last N events per node (default: all kept)")


class DeploymentsQuery(Query):
    """How many deployments to list."""

    limit: int = Field(50, ge=1, le=10000)


class EventsQuery(Query):
    """Where to resume a progress stream."""

    after: int = Field(0, ge=0, description="skip that many log entries")


class LiveQuery(Query):
    """How long a live stream lasts."""

    seconds: float | None = Field(None, gt=0, le=86400, description="end the stream after that many seconds "
                                  "(default: until the client goes away)")


class StatsQuery(Query):
    """Which deployment's steps, in which format."""

    deployment: str | None = None
    format: Literal["json", "csv"] = "json"


# -- responses ------------------------------------------------------------------------------------------


class Health(Answer):
    """Liveness and counters of every service."""

    status: Literal["ok"] = "ok"
    nodes: int = Field(description="nodes in the inventory")
    counters: dict[str, dict[str, int]] = Field(description="per service (http, tftp, ...): its counters")


class WhoAmI(Answer):
    """The user of the token."""

    name: str
    admin: bool


class Profile(Answer):
    """A boot profile as served: the one-time token in its cmdline is redacted."""

    kind: str
    kernel: str
    initrds: list[str]
    cmdline: str
    env: str
    params: dict[str, str]

    @classmethod
    def of(cls, profile: BootProfile) -> "Profile":
        """Return the served form of a profile."""
        return cls(kind=profile.kind, kernel=profile.kernel, initrds=list(profile.initrds),
                   cmdline=redact_cmdline(profile.cmdline), env=profile.env, params=dict(profile.params))


class Event(Answer):
    """One record of a node's progress (domain/progress.py): its kind, and its other fields in detail."""

    mac: str
    kind: str
    ts: float
    detail: dict[str, str | int | float | bool | None]


class NodeView(Answer):
    """A node with its boot profile and last events."""

    name: str
    mac: str
    ip: str
    rack: str
    profile: Profile
    events: list[Event]


class NodeList(Answer):
    """Every inventory node."""

    nodes: list[NodeView]


class NodeRunView(Reported):
    """One node's progress in a running deployment."""

    node: str
    state: str
    step: str
    impl: str
    reason: str


class Failure(Reported):
    """A node that failed, where and why."""

    node: str
    step: str
    impl: str
    reason: str


class DeploymentReport(Reported):
    """A deployment the controller runs or ran since the appliance started."""

    id: str
    env: str
    user: str
    status: str
    started: float
    finished: float | None
    ok: list[str]
    ko: list[Failure]
    ok_nodeset: str
    ko_nodeset: str
    nodes: list[NodeRunView]


class StoredNode(Reported):
    """One node's last state in a stored deployment."""

    node: str
    state: str
    step: str
    impl: str
    reason: str
    updated: float | None


class StoredDeployment(Reported):
    """A deployment as the state database keeps it."""

    id: str
    user: str
    env: str
    node_set: list[str]
    method: str
    status: str
    created: float
    finished: float | None
    params: dict[str, Any]
    nodes: list[StoredNode]


class DeploymentSummary(Reported):
    """One line of the deployment list."""

    id: str
    user: str
    env: str
    node_count: int
    method: str
    status: str
    created: float
    finished: float | None


class DeploymentList(Answer):
    """The latest deployments the user may see."""

    deployments: list[DeploymentSummary]


class Deployment(RootModel[DeploymentReport | StoredDeployment]):
    """A deployment: the controller's report while it is known to it, else the stored record."""


class ProgressLine(Reported):
    """One JSON line of a progress stream: a log entry ({ts, node, what, ...}), {what: finished, status} or
    the closing {what: result, result}."""

    what: str


class TransitionRecord(Answer):
    """One state change of one node, as persisted when it happened."""

    node: str
    ts: float
    from_state: str
    to_state: str
    step: str
    impl: str
    reason: str


class TransitionList(Answer):
    """Every state change of a deployment's nodes, oldest first."""

    id: str
    transitions: list[TransitionRecord]


class Cancelled(Answer):
    """A cancelled deployment."""

    id: str
    cancelled: bool


class PartitionView(Answer):
    """One partition of an environment's disk layout."""

    name: str
    size: str
    fs: str
    mount: str


class EnvironmentView(Answer):
    """An environment of the catalog."""

    name: str
    version: int
    owner: str
    visibility: str
    description: str
    image_path: str
    image_kind: str
    compression: str
    sha256: str
    size: int
    target_disk: str
    layout: list[PartitionView]
    deploy_partition: str
    postinstall: list[str]
    boot_kind: str
    kernel: str
    initrd: str
    cmdline: str
    kexec: bool
    created: float


class EnvironmentList(Answer):
    """Environments visible to the user."""

    environments: list[EnvironmentView]


class Removed(Answer):
    """What was removed."""

    removed: str


class PowerResult(Answer):
    """One node's power outcome."""

    node: str
    ok: bool
    state: str | None = None
    error: str | None = None


class PowerAnswer(Answer):
    """Power outcome per node."""

    op: str
    results: list[PowerResult]


class RebootResult(Reported):
    """One node's reboot outcome."""

    node: str
    ok: bool
    reason: str
    stage: str


class RebootAnswer(Answer):
    """Reboot outcome per node."""

    level: str
    to: str
    results: list[RebootResult]


class ExecNode(Answer):
    """One node's command outcome."""

    name: str
    status: int | None
    stdout: str
    stderr: str
    timed_out: bool
    error: str | None
    duration: float
    via: str


class ExecAnswer(Answer):
    """Every node's outcome, and the same grouped by identical output."""

    command: str
    seconds: float
    ok: list[str]
    failed: list[str]
    nodes: dict[str, ExecNode]
    grouped: list[tuple[str, ExecNode]] = Field(description="[folded node set, a representative result] per distinct output")


class Right(Answer):
    """Rights on a node set."""

    nodes: str
    perms: list[str]


class UserView(Answer):
    """A user and its rights."""

    name: str
    admin: bool
    rights: list[Right]


class UserList(Answer):
    """Users and their rights."""

    users: list[UserView]


class NewUser(Answer):
    """A new user and its API token (shown once)."""

    name: str
    token: str


class Granted(Answer):
    """Rights given."""

    user: str
    nodes: str
    perms: list[str]


class StepRecord(Answer):
    """One attempt of a step on a node."""

    deployment: str
    node: str
    step: str
    impl: str
    attempt: int
    started: float
    ended: float
    duration: float
    ok: bool
    reason: str


class StepSummary(Answer):
    """Attempts, failures and durations of one step."""

    attempts: int
    failures: int
    total_s: float
    max_s: float


class Stats(Answer):
    """Per deployment, node and step: durations, retries, errors."""

    steps: list[StepRecord]
    summary: dict[str, StepSummary]


class Error(Answer):
    """An error."""

    error: str
