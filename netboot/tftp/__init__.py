"""TFTP: codec, sans-io sender sessions, asyncio transport."""
