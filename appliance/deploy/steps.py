"""The macro-step runners, dispatched through RUNNERS (step name -> runner): SetDeploymentEnv, BroadcastEnv and
BootNewEnv of a deployment, and Reboot, the one step of a reboot workflow.

A per-node step tries its implementations in order, each with its retries, on the nodes still failing; an
attempt ends OK, FAILED (the next try may do better) or HOPELESS (the node fails the step at once).
"""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Protocol

from appliance.catalog import Environment
from appliance.deploy.bootprofiles import deploy_profile, installed_profile
from appliance.deploy.bootwatch import DEPLOY, INSTALLED, NETBOOT, Stage
from appliance.deploy.deps import ControllerDeps
from appliance.deploy.drivers import DeployError
from appliance.deploy.nodestate import Attempt, NodeRun, NodeState, Outcome
from appliance.deploy.reboot import LADDERS, Hopeless, Rebooter, describe_watch
from appliance.deploy.report import Journal
from appliance.deploy.workflow import REBOOT, Implementation, MacroStep, Workflow
from domain.profiles import BootProfile
from domain.progress import ProfileSet


class Deployment(Protocol):
    """What a step runner uses of the deployment running it (appliance/deploy/deployment.py)."""

    id: str
    env: Environment
    ssh_keys: tuple[str, ...]
    workflow: Workflow
    deps: ControllerDeps
    journal: Journal
    rebooter: Rebooter

    def fail(self, run: NodeRun, step: str, impl: str, reason: str) -> None:
        """Fail one node in a step, with the reason."""


StepRunner = Callable[[Deployment, MacroStep, list[NodeRun]], Awaitable[None]]
NodeBody = Callable[[Deployment, NodeRun, Implementation], Awaitable[str | None]]


def _give_deploy_profile(dep: Deployment, run: NodeRun) -> None:
    """Expect the node's agent to claim its token, and point its next boot at the deploy environment."""
    dep.deps.tokens.expect(run.node.mac, dep.id, str(run.node.ip))
    dep.deps.profiles.set(run.node.mac, deploy_profile(dep.deps.deploy_profile, run.node, dep.id, dep.env))


async def set_deployment_env(dep: Deployment, run: NodeRun, impl: Implementation) -> str | None:
    """Boot the node into the deploy environment and prepare its disk; None when done, else why not."""
    _give_deploy_profile(dep, run)
    dep.deps.events.publish(ProfileSet(run.node.mac, "deploy", dep.env.ref, dep.id))
    why = await dep.rebooter.boot(run, DEPLOY, LADDERS.get(impl.name, ("hard",)))
    if why is not None:
        return why
    try:
        await dep.deps.agent.prepare_disk(run.node, dep.env)
    except DeployError as exc:
        return f"disk preparation failed: {exc}"
    return None


async def boot_new_env(dep: Deployment, run: NodeRun, impl: Implementation) -> str | None:
    """Boot the node into the installed system (kexec or a reboot) and check it is the right one."""
    # The installed system calls back with the token the post-install wrote into it, once per boot asked for.
    if not dep.deps.tokens.rearm(run.node.mac, dep.id):
        dep.deps.tokens.issue(run.node.mac, dep.id, str(run.node.ip))
    dep.deps.profiles.set(run.node.mac, installed_profile(dep.env))
    dep.deps.events.publish(ProfileSet(run.node.mac, dep.env.boot_kind, dep.env.ref, dep.id))
    if impl.name == "kexec":
        if not dep.env.kexec:
            return "kexec not allowed by the environment"
        why = await dep.rebooter.boot(run, INSTALLED, (), kexec_env=dep.env)
    else:
        why = await dep.rebooter.boot(run, INSTALLED, LADDERS.get(impl.name, ("hard",)))
    if why is not None:
        return why
    booted = run.callback.get("env", "")
    if booted and booted != dep.env.ref:
        return f"the node booted {booted!r}, not {dep.env.ref!r}"
    return None


async def reboot_node(dep: Deployment, run: NodeRun, impl: Implementation) -> str | None:
    """Reboot the node towards the workflow's target (deploy, local, an environment, or netboot as is)."""
    to = dep.workflow.reboot_to
    target = NETBOOT
    profile: BootProfile | None = None
    if to == "deploy":
        _give_deploy_profile(dep, run)
        target = DEPLOY
    elif to == "local":
        profile = BootProfile(kind="local")
    elif to:
        profile = installed_profile(dep.env)
    if profile is not None:
        dep.deps.profiles.set(run.node.mac, profile)
    if to:
        dep.deps.events.publish(ProfileSet(run.node.mac, dep.deps.profiles.get(run.node.mac).kind, dep.env.ref, dep.id))
    return await dep.rebooter.boot(run, target, LADDERS[impl.name])


async def _attempts(dep: Deployment, step: MacroStep, impl: Implementation, run: NodeRun, body: NodeBody,
                    timeout: float, previous: str) -> Attempt:
    """Run one implementation on one node with its retries; return how it ended."""
    why = ""
    for n in range(impl.retries + 1):
        if run.finished:  # taken over by a forced deployment meanwhile: it is not ours any more
            return Attempt(Outcome.HOPELESS, run.reason)
        started = time.time()
        dep.journal.move(run, NodeState(step.name), step.name, impl.name, why or previous)
        outcome = Outcome.FAILED
        try:
            async with asyncio.timeout(timeout):
                found = await body(dep, run, impl)
            outcome, why = (Outcome.OK, "") if found is None else (Outcome.FAILED, found)
        except Hopeless as exc:
            outcome, why = Outcome.HOPELESS, str(exc)
        except TimeoutError:
            why = f"{step.name}/{impl.name} timed out after {timeout:.0f}s{describe_watch(run)}"
        if not (outcome is Outcome.FAILED and run.watch is not None and run.watch.stage is Stage.STUCK
                and run.watch.target == INSTALLED):
            run.end_watch()  # else kept: the installed system may call back late, while the next implementation waits
        dep.deps.store.log_step(dep.id, run.node.name, step.name, impl.name, n, started, outcome is Outcome.OK, why)
        run.step_times[step.name] = run.step_times.get(step.name, 0.0) + time.time() - started
        if outcome is not Outcome.FAILED:
            if outcome is Outcome.HOPELESS:
                dep.journal.note(run, "impl_failed", step=step.name, impl=impl.name, reason=why)
            return Attempt(outcome, why)
        dep.journal.note(run, "retry" if n < impl.retries else "impl_failed", step=step.name, impl=impl.name, reason=why)
    return Attempt(Outcome.FAILED, why)


def per_node(body: NodeBody) -> StepRunner:
    """Return the runner of a per-node macro-step whose work on one node is body."""

    async def run_step(dep: Deployment, step: MacroStep, runs: list[NodeRun]) -> None:
        pending = list(runs)
        previous: dict[str, str] = {}
        for impl in step.implementations:
            if not pending:
                break
            timeout = impl.timeout_for(len(runs))
            attempts: dict[str, Attempt] = {}

            async def attempt(run: NodeRun) -> None:
                attempts[run.node.name] = a = await _attempts(dep, step, impl, run, body, timeout, previous.get(run.node.name, ""))
                if a.outcome is Outcome.OK and step is dep.workflow.steps[-1]:
                    # Through the last step: the node is deployed now, not when the slowest node is (a cancel or a
                    # crash later does not undo it, and its report time is its own).
                    dep.journal.move(run, NodeState.DONE, step.name, impl.name)

            async with asyncio.TaskGroup() as tg:
                for run in pending:
                    tg.create_task(attempt(run))
            still = []
            for r in pending:
                a = attempts[r.node.name]
                if a.outcome is Outcome.OK:
                    continue
                if a.outcome is Outcome.HOPELESS or impl is step.implementations[-1]:
                    dep.fail(r, step.name, impl.name, a.reason)
                else:
                    r.notes.append(f"{step.name}/{impl.name}: {a.reason}")
                    previous[r.node.name] = a.reason
                    still.append(r)
            pending = still

    return run_step


async def broadcast_env(dep: Deployment, step: MacroStep, runs: list[NodeRun]) -> None:
    """Broadcast the image with each method in turn to the nodes the previous one failed; then post-install."""
    pending = list(runs)
    image = dep.deps.catalog.image_file(dep.env)
    previous: dict[str, str] = {}
    for impl in step.implementations:
        pending = [r for r in pending if not r.finished]
        if not pending:
            break
        started = time.time()
        for r in pending:
            dep.journal.move(r, NodeState(step.name), step.name, impl.name, previous.get(r.node.name, ""))
        timeout = impl.timeout_for(len(pending))
        try:
            async with asyncio.timeout(timeout):
                outcome = await dep.deps.agent.broadcast(impl.name, [r.node for r in pending], dep.env, image)
            results = outcome.nodes
            dep.journal.note(None, "broadcast", step=step.name, impl=impl.name, nodes=len(pending),
                             ok=sum(1 for ok, _ in results.values() if ok), arm_s=round(outcome.arm_seconds, 1),
                             stream_s=round(outcome.seconds, 1), **outcome.counters)
        except TimeoutError:
            results = {r.node.name: (False, f"{impl.name} broadcast timed out after {timeout:.0f}s") for r in pending}
        except DeployError as exc:
            results = {r.node.name: (False, f"{impl.name} broadcast failed: {exc}") for r in pending}
        still = []
        for r in pending:
            ok, why = results.get(r.node.name, (False, "no result from the broadcast"))
            dep.deps.store.log_step(dep.id, r.node.name, step.name, impl.name, 0, started, ok, why)
            r.step_times[step.name] = r.step_times.get(step.name, 0.0) + time.time() - started
            if ok:
                continue
            if impl is step.implementations[-1]:
                dep.fail(r, step.name, impl.name, why)
            else:
                r.notes.append(f"{step.name}/{impl.name}: {why}")
                previous[r.node.name] = why
                still.append(r)
        pending = still

    async def post(run: NodeRun) -> None:
        try:
            await dep.deps.agent.post_install(run.node, dep.env, dep.ssh_keys)
        except DeployError as exc:
            dep.fail(run, step.name, "post_install", f"post-install failed: {exc}")

    async with asyncio.TaskGroup() as tg:
        for r in runs:
            if not r.failed:
                tg.create_task(post(r))


# Which runner does which macro-step.
RUNNERS: dict[str, StepRunner] = {
    "SetDeploymentEnv": per_node(set_deployment_env),
    "BroadcastEnv": broadcast_env,
    "BootNewEnv": per_node(boot_new_env),
    REBOOT: per_node(reboot_node),
}
