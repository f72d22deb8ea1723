"""The runtime type checker the test suite installs on the memloc package (tests/conftest.py):
beartype with PEP 484's implicit numeric tower (an ``int`` is accepted where ``float`` is
annotated, as every Python type checker reads it), under jaxtyping's shape checks."""

from beartype import BeartypeConf, beartype

typechecker = beartype(conf=BeartypeConf(is_pep484_tower=True))
