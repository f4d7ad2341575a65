"""The OpenAPI 3.1 document of /api/v1, generated from the route table and the routes' pydantic models."""
from __future__ import annotations

from typing import Any, Iterable

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from appliance.api import models as m
from appliance.api.routes import Route

REF_TEMPLATE = "#/components/schemas/{model}"
INFO = {"title": "rackboot", "version": "1",
        "description": "Network-boot appliance: deployments, environments, nodes, users. "
                       "Every operation but the open ones needs a user's API token (Authorization: Bearer TOKEN)."}
STATUS_TEXT = {200: "OK", 201: "created", 400: "bad request: the message names the field", 401: "no or unknown token",
               403: "no right", 404: "not found", 409: "conflict", 501: "not supported by this appliance"}


Refs = dict[tuple[Any, JsonSchemaMode], Any]


def _schemas(routes: Iterable[Route]) -> tuple[Refs, dict[str, Any]]:
    """Return the $ref of every (model, mode) the routes use, and the component schemas they point to."""
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m.Error, "serialization")]
    for r in routes:
        if r.body is not None:
            wanted.append((r.body, "validation"))
        if r.response is not None:
            wanted.append((r.response, "serialization"))
    wanted = list(dict.fromkeys(wanted))
    refs, top = models_json_schema(wanted, ref_template=REF_TEMPLATE)
    return dict(refs), top.get("$defs", {})


def _parameters(route: Route) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                                    for p in route.path_params]
    if route.query is not None:
        schema = route.query.model_json_schema(ref_template=REF_TEMPLATE)
        required = set(schema.get("required", ()))
        for name, prop in schema.get("properties", {}).items():
            param: dict[str, Any] = {"name": name, "in": "query", "required": name in required, "schema": prop}
            if "description" in prop:
                param["description"] = prop["description"]
            params.append(param)
    return params


def _operation(route: Route, refs: Refs) -> dict[str, Any]:
    error_ref = {"application/json": {"schema": refs[(m.Error, "serialization")]}}
    op: dict[str, Any] = {"summary": route.summary, "operationId": route.handler.__name__,
                          "x-rackboot-access": route.access}
    if route.handler.__doc__:
        op["description"] = route.handler.__doc__.strip()
    if route.right:
        op["x-rackboot-right"] = route.right
    params = _parameters(route)
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[(route.body, "validation")]}}}
    elif route.multipart is not None:
        props = {name: {"type": "string", "format": "binary", "description": what} for name, what in route.multipart.items()}
        op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "properties": props, "required": [next(iter(route.multipart))]}}}}
    content: dict[str, Any] = {}
    if route.response is not None:
        content[route.media] = {"schema": refs[(route.response, "serialization")]}
    elif route.media == "application/json":
        content[route.media] = {"schema": {"type": "object"}}
    else:
        content[route.media] = {"schema": {"type": "string"}}
    for media, when in route.also.items():
        content[media] = {"schema": {"type": "string", "description": when}}
    responses: dict[str, Any] = {str(route.status): {"description": STATUS_TEXT.get(route.status, "OK"), "content": content}}
    errors = set(route.errors)
    if route.body is not None or route.query is not None or route.multipart is not None:
        errors.add(400)
    if route.access != "open":
        errors.add(401)
    if route.access == "admin" or route.right:
        errors.add(403)
    if route.path_params:
        errors.add(404)
    for status in sorted(errors):
        responses[str(status)] = {"description": STATUS_TEXT[status], "content": error_ref}
    op["responses"] = responses
    if route.access == "open":
        op["security"] = []
    return op


def build_openapi(routes: Iterable[Route]) -> dict[str, Any]:
    """Return the OpenAPI document of the given routes."""
    routes = list(routes)
    refs, schemas = _schemas(routes)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, refs)
    return {
        "openapi": "3.1.0",
        "info": INFO,
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
        "security": [{"token": []}],
    }
