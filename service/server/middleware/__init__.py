"""Pure ASGI middleware: request limits (body size, timeout) and request metrics."""
