"""docs/api.md is the API: generated from the OpenAPI document, it must be regenerated when the API changes."""
from __future__ import annotations

from pathlib import Path

from appliance.api.reference import current
from appliance.api.routes import ROUTES

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_docs_api_md_is_generated_from_this_api() -> None:
    assert DOC.read_text() == current(), "docs/api.md is out of step: .venv/bin/python -m appliance.api.reference > docs/api.md"


def test_every_route_is_in_the_reference() -> None:
    text = DOC.read_text()
    for route in ROUTES:
        assert f"### `{route.method} {route.path}`" in text, route.path
