"""The HTTP edge: the FastAPI app, typed state, dependencies, security, middleware, error mapping, v1 and v2 routes."""
