"""DHCPv4: codec, PXE/lease policy, asyncio transport."""
