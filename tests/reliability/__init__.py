"""Reliability suite (issue 8, item 4): malformed uploads, schemathesis over the whole API,
kill -9 of the server and the worker, PostgreSQL outages under load, and many concurrent
clients. Each suite is a plain function in this package returning a ``SuiteResult`` whose
``line`` is the one summary line; the ``test_*`` modules run them at a short size and
``benchmarks/reliability.py`` at full size."""
