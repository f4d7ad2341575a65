"""schemathesis against the generated OpenAPI document: the real API on loopback, as admin and without a token.

`st run` (a subprocess, so the API keeps serving in this event loop) loads /api/v1/openapi.json and runs its
phases (examples, coverage, fuzzing, stateful) on every operation with the checks below: no 5xx, every
status, content type, header and body as documented, schema-violating requests refused, methods the
document does not list answered 405, no operation answering without its token. Half of the generated
path parameters and node sets are real ones (an environment, a deployment, the inventory's nodes), so the
handlers behind the 404s and 400s run too. Not checked: positive_data_acceptance, which takes any
schema-valid body for one the API must accept; node sets naming no inventory node, environments that do
not exist and strings that are not OpenSSH keys are refused by meaning, not by shape.
RACKBOOT_SCHEMATHESIS_EXAMPLES and RACKBOOT_SCHEMATHESIS_CHECKS widen a run by hand (docs/reliability.md).
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

import test_api
from test_api import World, add_env, tgz

world = test_api.world  # the fixture: the API on loopback, with the controller and fakes behind it

CHECKS = os.environ.get("RACKBOOT_SCHEMATHESIS_CHECKS", ",".join((
    "not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
    "response_headers_conformance", "negative_data_rejection", "unsupported_method", "missing_required_header",
    "ignored_auth", "use_after_free", "ensure_resource_availability")))
EXAMPLES = int(os.environ.get("RACKBOOT_SCHEMATHESIS_EXAMPLES", "15"))
SEED = 11


def config(path: Path, *, env: str, deployment: str) -> Path:
    """Write a schemathesis config that draws half of the path parameters and node sets from real ones."""
    dictionaries = {"nodesets": ["node-1", "node-[2-3]", "node-[1-6]"], "envs": [env, f"{env}:1"], "deployments": [deployment],
                    "names": ["node-4", "st-user"]}
    lines = [f"[dictionaries.{name}]\nvalues = {json.dumps(values)}\n" for name, values in dictionaries.items()]
    lines.append("[parameters]\n" + "".join(f'"{key}" = {{ dictionary = "{d}", probability = 0.5 }}\n' for key, d in (
        ("body.nodes", "nodesets"), ("body.env", "envs"), ("path.ref", "envs"), ("path.id", "deployments"),
        ("path.name", "names"))))
    path.write_text("\n".join(lines))
    return path


async def schemathesis(base: str, token: str | None, workdir: Path) -> tuple[int, str]:
    """Run `st run` against the API's OpenAPI document; return its exit code and output."""
    st = Path(sys.executable).with_name("st")
    args = [str(st), "--config-file", str(workdir / "schemathesis.toml"), "run", f"{base}/api/v1/openapi.json",
            "--checks", CHECKS, "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--workers", "1",
            "--request-timeout", "20", "--report", "junit", "--report-dir", str(workdir), "--no-color",
            # the dashboard's feed (server-sent events) lasts until the client goes away: tests/test_dashboard.py covers it
            "--exclude-path", "/api/v1/live"]
    if token:
        args += ["-H", f"Authorization: Bearer {token}"]
    proc = await asyncio.create_subprocess_exec(*args, cwd=workdir, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def _real_values(world: World, workdir: Path) -> None:
    """An environment, a user and a finished deployment for the operations on them; write the config naming them."""
    status, env = await add_env(world.client, world.admin, "st-env", "public")
    assert status == 201, env
    assert (await world.client.call("POST", "/api/v1/users", world.admin, json={"name": "st-user"}))[0] == 201
    status, dep = await world.client.call("POST", "/api/v1/deployments", world.admin, json={"nodes": "node-6", "env": "st-env"})
    assert status == 201, dep
    await asyncio.wait_for(world.api.deps.controller.tasks[dep["id"]], 30)  # type: ignore[attr-defined]
    config(workdir / "schemathesis.toml", env="st-env", deployment=dep["id"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("who", ["admin", "anonymous"])
async def test_schemathesis_finds_no_server_error_and_no_schema_violation(world: World, tmp_path: Path, who: str) -> None:
    await _real_values(world, tmp_path)
    rc, out = await schemathesis(world.client.base, world.admin if who == "admin" else None, tmp_path)
    summary = out[out.find("=== SUMMARY"):] if "=== SUMMARY" in out else out[-3000:]
    print(f"\n[schemathesis {who}] " + " ".join(line.strip() for line in summary.splitlines() if "generated" in line))
    assert rc == 0, out[-8000:]
    assert "generated" in out and " 0 generated" not in out, out[-3000:]


# -- what schemathesis found (docs/reliability.md, "Access"): each was a 500, a lock-out or an undocumented answer --------


async def _post_env(world: World, body: bytes, content_type: str | None) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {world.admin}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    async with world.client.session.post(world.client.base + "/api/v1/environments", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


def _multipart(*parts: tuple[str, str | None, bytes], boundary: str = "b0undary") -> tuple[bytes, str]:
    """A multipart/form-data body built by hand, so a test can send what aiohttp's client would not."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def test_environment_upload_that_is_not_multipart_is_a_400(world: World) -> None:
    for content_type in (None, "application/json", "text/plain"):  # was a 500: KeyError 'Content-Type' / an assertion
        status, err = await _post_env(world, b"{}", content_type)
        assert status == 400 and "multipart/form-data" in err["error"], (content_type, err)  # type: ignore[index]


async def test_environment_description_that_is_not_yaml_text_is_a_400(world: World) -> None:
    for description in (b"\x89PNG\r\n\x1a\n", b"name: a\x00b\n"):  # was a 500: UnicodeDecodeError / yaml's ReaderError
        status, err = await _post_env(world, *_multipart(("description", "d.yaml", description)))
        assert status == 400 and ("not UTF-8" in err["error"] or "not YAML" in err["error"]), err  # type: ignore[index]


async def test_a_malformed_multipart_part_is_a_400(world: World) -> None:
    # a part header with a control character, which aiohttp's parser refuses (InvalidHeader): was a 500
    body = b'--b0undary\r\nContent-Disposition: form-data; name="\xc3\xb1=\xf3\x80\x19%22"\r\n\r\n{}\r\n--b0undary--\r\n'
    status, err = await _post_env(world, body, "multipart/form-data; boundary=b0undary")
    assert status == 400 and "bad multipart body" in err["error"], err  # type: ignore[index]


async def test_an_upload_with_a_description_that_is_no_mapping_or_an_odd_file_name_is_refused_or_stored(world: World) -> None:
    # were 500s: data.setdefault on a list, data['image']['file'] on an int
    status, err = await _post_env(world, *_multipart(("description", "d.yaml", b"- a list\n"), ("image", "x.tgz", tgz())))
    assert status == 400 and "mapping" in err["error"], err  # type: ignore[index]
    status, env = await _post_env(world, *_multipart(("description", "d.yaml", b"name: x\nimage: 5\n"), ("image", "x.tgz", tgz())))
    assert status == 201 and env["name"] == "x", env  # type: ignore[index]  # the upload is the image, whatever the description said
    for i, filename in enumerate(("..", ".", "environment.yaml")):  # '..' was a 500 (a directory); environment.yaml replaced the description
        description = f"name: odd{i}\nversion: 1\nimage: {{kind: tar}}\n".encode()
        status, env = await _post_env(world, *_multipart(("description", "d.yaml", description), ("image", filename, tgz())))
        assert status == 201 and env["name"] == f"odd{i}", (filename, env)  # type: ignore[index]


async def test_request_bodies_are_strict_about_json_types(world: World) -> None:
    client, admin = world.client, world.admin
    status, err = await client.call("POST", "/api/v1/users", admin, json={"name": "zero", "admin": 0})  # was 201 (0 taken for false)
    assert status == 400 and "admin" in err["error"], err
    status, err = await client.call("POST", "/api/v1/exec", admin, json={"nodes": "node-1", "command": "true", "fanout": "4"})
    assert status == 400 and "fanout" in err["error"], err
    status, _ = await client.call("POST", "/api/v1/exec", admin, json={"nodes": "node-1", "command": "true", "timeout": 5})
    assert status == 200  # an integer is a JSON number


async def test_other_methods_on_open_paths_are_405_without_a_token(world: World) -> None:
    for method, path in (("TRACE", "/api/v1/health"), ("PUT", "/api/v1/openapi.json"), ("POST", "/api/v1/health")):
        assert (await world.client.call(method, path))[0] == 405, (method, path)  # were 401: the method looked like a private path
    assert (await world.client.call("TRACE", "/api/v1/nodes"))[0] == 401  # a private path tells strangers nothing, as before


async def test_removing_an_unknown_user_is_a_404_and_the_last_admin_stays(world: World) -> None:
    client, admin = world.client, world.admin
    status, err = await client.call("DELETE", "/api/v1/users/nobody", admin)  # was 200 {"removed": "nobody"}
    assert status == 404 and "nobody" in err["error"], err
    status, err = await client.call("DELETE", "/api/v1/users/admin", admin)  # was 200, and then every call was a 401
    assert status == 409 and "last admin" in err["error"], err
    assert (await client.call("GET", "/api/v1/whoami", admin))[0] == 200
    status, other = await client.call("POST", "/api/v1/users", admin, json={"name": "root2", "admin": True})
    assert status == 201
    assert (await client.call("DELETE", "/api/v1/users/admin", admin))[0] == 200  # another admin remains
    assert (await client.call("GET", "/api/v1/users", other["token"]))[0] == 200
