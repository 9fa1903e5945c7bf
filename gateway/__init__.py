"""HTTP and WebSocket gateway (Starlette)."""
