"""The HTTP layer: protocol models, routers, and the serving logic between them and the engine."""
