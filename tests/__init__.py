from . import _typecheck  # noqa: F401  (the runtime type checker conftest installs on memloc)
