"""The REST API under /api/v1: route table, models, generated OpenAPI document, auth; `Api` wires it on aiohttp."""
from appliance.api.server import Api

__all__ = ["Api"]
