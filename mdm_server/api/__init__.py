"""The HTTP API (aiohttp): one module per resource; only this package speaks HTTP."""
