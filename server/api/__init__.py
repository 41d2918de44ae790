"""HTTP layer: OpenAI protocol, routes, errors, auth, SSE."""
