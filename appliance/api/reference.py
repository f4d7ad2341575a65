"""docs/api.md, generated from the OpenAPI document (so the reference is the API: a test keeps the file in step).

    .venv/bin/python -m appliance.api.reference > docs/api.md
"""
from __future__ import annotations

import json
from typing import Any

HEADER = """# API reference

Generated from the OpenAPI document the appliance serves at `GET /api/v1/openapi.json` (`python -m
appliance.api.reference > docs/api.md`; `tests/test_api_reference.py` fails when this file is out of step).
Every operation but the open ones needs a user's token: `Authorization: Bearer TOKEN` (`rackboot user add`
prints one; the admin's is `STATE_DIR/admin.token`). Errors are JSON: `{"error": "..."}`.
"""


def _type(schema: dict[str, Any]) -> str:
    """A short human name of a JSON schema's type."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_type(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
        return f"map of {_type(schema['additionalProperties'])}"
    return str(kind)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _operation(path: str, method: str, op: dict[str, Any]) -> list[str]:
    access = op.get("x-rackboot-access", "user")
    who = {"open": "open (no token)", "admin": "admin"}.get(access, "any user")
    if op.get("x-rackboot-right"):
        who = f"the `{op['x-rackboot-right']}` right on the nodes (or admin)"
    summary = _cell(op.get("summary", ""))
    lines = [f"### `{method.upper()} {path}`", "", f"{summary[:1].upper()}{summary[1:]}. Access: {who}.", ""]
    description = _cell(op.get("description", ""))
    if description.startswith(f"{method.upper()} "):  # the handler's docstring names its route first
        description = description.split(": ", 1)[1] if ": " in description else ""
    if description and description.rstrip(".") != summary:
        lines += [f"{description[:1].upper()}{description[1:]}", ""]
    params = op.get("parameters", [])
    if params:
        lines += ["| parameter | in | type | required | description |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| `{p['name']}` | {p['in']} | {_type(p.get('schema', {}))} | {'yes' if p.get('required') else 'no'} | "
                  f"{_cell(p.get('description', ''))} |" for p in params]
        lines.append("")
    body = op.get("requestBody", {}).get("content", {})
    for media, content in body.items():
        lines += [f"Body ({media}): {_type(content.get('schema', {}))}", ""]
    answers = []
    for status, response in op.get("responses", {}).items():
        kinds = [f"{_type(c.get('schema', {}))} ({media})" for media, c in response.get("content", {}).items()]
        answers.append(f"| {status} | {_cell(response.get('description', ''))} | {', '.join(kinds)} |")
    lines += ["| status | meaning | body |", "| --- | --- | --- |", *answers, ""]
    return lines


def _schema(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f"### {name}", ""]
    if schema.get("description"):
        lines += [_cell(schema["description"]), ""]
    props = schema.get("properties", {})
    if props:
        required = set(schema.get("required", ()))
        lines += ["| field | type | required | description |", "| --- | --- | --- | --- |"]
        lines += [f"| `{field}` | {_type(prop)} | {'yes' if field in required else 'no'} | {_cell(prop.get('description', ''))} |"
                  for field, prop in props.items()]
        lines.append("")
    elif "anyOf" in schema or "type" in schema:
        lines += [f"One of: {_type(schema)}", ""]
    return lines


def markdown(document: dict[str, Any]) -> str:
    """The reference of an OpenAPI document, as markdown: operations by path, then the schemas."""
    lines = [HEADER, "## Operations", ""]
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            lines += _operation(path, method, op)
    lines += ["## Schemas", ""]
    for name, schema in sorted(document.get("components", {}).get("schemas", {}).items()):
        lines += _schema(name, schema)
    return "\n".join(lines).rstrip() + "\n"


def current() -> str:
    """The reference of this checkout's API."""
    from appliance.api.openapi import build_openapi
    from appliance.api.routes import ROUTES

    return markdown(json.loads(json.dumps(build_openapi(ROUTES))))


if __name__ == "__main__":
    print(current(), end="")
