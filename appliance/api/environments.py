"""Handlers on the environment catalog: list, show, add (multipart upload), remove."""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import yaml
from aiohttp import BodyPartReader

from appliance.api import models as m
from appliance.api.base import ApiError, Call
from appliance.api.deps import ApiDeps
from appliance.catalog import CatalogError, Environment, parse_environment_file
from domain.errors import ConfigError

UPLOAD_CHUNK = 1 << 20
# The multipart parts of POST /api/v1/environments (described in its route entry).
ENV_PARTS = {
    "description": "the environment description (YAML)",
    "image": "the image file, streamed to disk; replaces whatever file or URL the description names",
}


def env_view(env: Environment) -> m.EnvironmentView:
    """Return the served form of an environment."""
    return m.EnvironmentView.model_validate(env.to_json())


async def list_envs(deps: ApiDeps, call: Call) -> m.EnvironmentList:
    """GET /api/v1/environments: environments visible to the user."""
    return m.EnvironmentList(environments=[env_view(e) for e in deps.catalog.list(call.me.name, call.me.admin)])


async def show_env(deps: ApiDeps, call: Call) -> m.EnvironmentView:
    """GET /api/v1/environments/REF: one environment (NAME or NAME:VERSION)."""
    try:
        return env_view(deps.catalog.get(call.param("ref"), call.me.name, call.me.admin))
    except CatalogError as exc:
        raise ApiError(404, str(exc)) from exc


async def remove_env(deps: ApiDeps, call: Call) -> m.Removed:
    """DELETE /api/v1/environments/REF: remove an environment (its owner or an admin)."""
    try:
        env = deps.catalog.remove(call.param("ref"), call.me.name, call.me.admin)
    except CatalogError as exc:
        raise ApiError(403 if "belongs to" in str(exc) else 404, str(exc)) from exc
    return m.Removed(removed=env.ref)


async def add_env(deps: ApiDeps, call: Call) -> m.EnvironmentView:
    """POST /api/v1/environments (multipart: description, image): add an environment to the catalog."""
    user = call.me
    if not deps.users.may_add_environments(user):
        raise ApiError(403, f"{user.name} has no 'deploy' right on any node: adding environments needs one")
    reader = await call.request.multipart()
    deps.stage_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=deps.stage_dir) as tmp:
        desc_path: Path | None = None
        image_name = ""
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue  # a nested multipart: not ours
            if part.name == "description":
                desc_path = Path(tmp) / "environment.yaml"
                desc_path.write_bytes(await part.read())
            elif part.name == "image":
                image_name = Path(part.filename or "image").name
                with open(Path(tmp) / image_name, "wb") as out:
                    while chunk := await part.read_chunk(UPLOAD_CHUNK):
                        out.write(chunk)
        if desc_path is None:
            raise ApiError(400, "missing the 'description' part")
        if image_name:
            data = yaml.safe_load(desc_path.read_text()) or {}
            data.setdefault("image", {})["file"] = image_name
            data["image"].pop("url", None)
            desc_path.write_text(yaml.safe_dump(data))
        try:
            env, source = parse_environment_file(desc_path, user.name, image_roots=(Path(tmp), *deps.image_files))
            stored = await asyncio.to_thread(deps.catalog.add, env, source)
        except ConfigError as exc:
            raise ApiError(400, "; ".join(p.replace(str(desc_path), "environment") for p in exc.problems)) from exc
        except CatalogError as exc:
            raise ApiError(409 if "exists" in str(exc) else 400, str(exc)) from exc
    return env_view(stored)

