"""Sub-commands of ``kronscope``: one module each, each with ``register(app)``.

Commands stay thin: they parse arguments and call the library or ``services``."""
