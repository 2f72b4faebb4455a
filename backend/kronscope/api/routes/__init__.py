"""One module per resource, each exposing ``router``; see ``kronscope.api.api_router``."""
