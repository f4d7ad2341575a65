"""Handlers on the environment catalog: list, show, add (multipart upload), remove."""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import yaml
from aiohttp import BodyPartReader
from aiohttp.http_exceptions import HttpProcessingError

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


DESCRIPTION_FILE = "environment.yaml"


def _upload_name(filename: str | None) -> str:
    """The uploaded image's file name in the staging directory: its base name, or 'image' when that cannot be a file name."""
    name = Path(filename or "").name
    if name in ("", ".", "..", DESCRIPTION_FILE) or "\0" in name or len(name.encode(errors="replace")) > 200:
        return "image"
    return name


async def _receive(call: Call, tmp: Path) -> tuple[Path | None, str]:
    """Stream the multipart parts to tmp; return the description's path (None when absent) and the image's file name."""
    reader = await call.request.multipart()
    desc_path: Path | None = None
    image_name = ""
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            continue  # a nested multipart: not ours
        if part.name == "description":
            desc_path = tmp / DESCRIPTION_FILE
            desc_path.write_bytes(await part.read())
        elif part.name == "image":
            image_name = _upload_name(part.filename)
            with open(tmp / image_name, "wb") as out:
                while chunk := await part.read_chunk(UPLOAD_CHUNK):
                    out.write(chunk)
    return desc_path, image_name


def _point_at_upload(desc_path: Path, image_name: str) -> None:
    """Make the description's image the uploaded file (a description that is not a YAML mapping is left for the parser to refuse)."""
    try:
        data = yaml.safe_load(desc_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return
    if not isinstance(data, dict):
        return
    image = data.get("image")
    data["image"] = {**(image if isinstance(image, dict) else {}), "file": image_name}
    data["image"].pop("url", None)
    desc_path.write_text(yaml.safe_dump(data))


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
    if call.request.content_type != "multipart/form-data":
        raise ApiError(400, f"expected a multipart/form-data body (parts: {', '.join(ENV_PARTS)}), got {call.request.content_type!r}")
    deps.stage_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=deps.stage_dir) as tmp:
        try:
            desc_path, image_name = await _receive(call, Path(tmp))
        except (ValueError, HttpProcessingError) as exc:  # aiohttp's words for a body that is not well-formed multipart
            raise ApiError(400, f"bad multipart body: {exc}") from exc
        if desc_path is None:
            raise ApiError(400, "missing the 'description' part")
        if image_name:
            _point_at_upload(desc_path, image_name)
        try:
            env, source = parse_environment_file(desc_path, user.name, image_roots=(Path(tmp), *deps.image_files))
            stored = await asyncio.to_thread(deps.catalog.add, env, source)
        except ConfigError as exc:
            raise ApiError(400, "; ".join(p.replace(str(desc_path), "environment") for p in exc.problems)) from exc
        except CatalogError as exc:
            raise ApiError(409 if "exists" in str(exc) else 400, str(exc)) from exc
    return env_view(stored)

