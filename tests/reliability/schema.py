"""Suite 2: schemathesis over every operation of the API, against a seeded app: two real
tiny SAEs uploaded through the API (a KronSAE with a harvest, its pages written through the
repositories, and a TopK without one), an explanation and a queued job.

Generated requests go half to random path values (mostly 404s) and half to the seeded
SAE, latent, head, explanation and job, so the deeper code paths are reached too. The
suite fails on any 5xx; other check failures (a response that does not match the
documented schema) are counted and listed beside it.

``tests/api/test_schemathesis.py`` walks the operations the same way; its loop cannot be
imported (it is the test function itself), so the walk is repeated here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._support import SuiteResult, folder_parts, make_checkpoint, seed_pages
from .uploads import make_keys

REQUEST_TIMEOUT_S = 60.0
"""A request slower than this counts as no response (the machine may be very busy)."""
EXCLUDE_FROM_KNOWN = {("DELETE", "/api/v1/saes/{sae}")}
"""Operations never aimed at the seeded resources (deleting the SAE ends the walk)."""


@dataclass
class World:
    """What the seeded app holds, as path parameter values."""

    known: dict[str, Any]
    headers: dict[str, str]
    keys: dict[str, str]


def seed_world(client: Any, db_url: str, work: Path) -> World:
    """Upload two tiny SAEs through ``client``, write pages for the KronSAE, add an
    explanation and queue a job."""
    keys = make_keys(db_url)
    headers = {"Authorization": f"Bearer {keys['upload']}"}
    kron = make_checkpoint(work / "kron", seed=11)
    topk = make_checkpoint(work / "topk", architecture="topk", seed=12, d_sae=24, k=3)
    slugs = []
    for folder, slug in ((kron, "rel-kron"), (topk, "rel-topk")):
        r = client.post(
            "/api/v1/saes", files=folder_parts(folder), data={"slug": slug}, headers=headers
        )
        assert r.status_code == 201, r.text
        slugs.append(slug)
    seed_pages(db_url, "rel-kron", seed=3)
    r = client.post(
        "/api/v1/saes/rel-kron/latents/3/explanations",
        json={"text": "seeded words"},
        headers=headers,
    )
    assert r.status_code == 201, r.text
    explanation = r.json()["id"]
    # Load the subject model now: the first inference request pays for it, not the walk.
    r = client.post("/api/v1/saes/rel-kron/activations", json={"text": "warm up"})
    assert r.status_code == 200, r.text
    r = client.post("/api/v1/saes/rel-topk/harvests", json={"tokens": 256}, headers=headers)
    assert r.status_code == 202, r.text
    job = r.json()["job"]["id"]
    known = {
        "sae": "rel-kron",
        "index": 3,
        "head": 1,
        "kind": "base",
        "explanation": explanation,
        "job": job,
    }
    return World(known, headers, keys)


# Operations whose schema-valid requests may rightly be refused with 422 for reasons no
# schema can state: an upload's file contents; a text that is only whitespace or token
# positions past the end of the text (inference); the "llm" backend on a server with no LLM
# endpoint configured (explain); a corpus name that is not one of the server's corpora, or
# a context length beyond the subject model's (harvests). Their responses are still checked
# against the schema.
DATA_DEPENDENT = {
    "POST /api/v1/saes",
    "POST /api/v1/saes/{sae}/harvests",
    "POST /api/v1/saes/{sae}/activations",
    "POST /api/v1/saes/{sae}/search",
    "POST /api/v1/saes/{sae}/explain",
}


def _failure_title(exc: BaseException) -> str:
    """The first line that names the failed check (``- ST202 Schema-valid request ...``)."""
    text = str(exc)
    for line in text.splitlines():
        if line.strip().startswith("- "):
            return line.strip()[2:][:200]
    return text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__


def run_schema_suite(app: Any, world: World, max_examples: int, *, seed: int = 0) -> SuiteResult:
    """Walk every operation of ``app``'s OpenAPI schema (the app's lifespan must be
    running, e.g. inside a ``TestClient`` block)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import positive_data_acceptance

    result = SuiteResult("schemathesis")
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)
    operations = []
    for item in schema.get_all_operations():
        try:
            operations.append(item.ok())
        except Exception as exc:  # an operation schemathesis cannot read is a finding too
            result.problems.append(f"unreadable operation: {exc}")
    # Deletes last, so the walk keeps its seeded resources as long as possible.
    operations.sort(key=lambda op: (op.method.upper() == "DELETE", op.label))
    tried = 0
    server_errors: list[str] = []
    violations: list[str] = []
    per_op: dict[str, int] = {}
    t0 = time.monotonic()

    def walk(operation: Any) -> None:
        label = operation.label
        aim = (operation.method.upper(), operation.path) not in EXCLUDE_FROM_KNOWN
        excluded = [positive_data_acceptance] if label in DATA_DEPENDENT else []
        state = {"n": 0}

        @given(case=operation.as_strategy())
        @settings(
            max_examples=max_examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            nonlocal tried
            state["n"] += 1
            if aim and state["n"] % 2 == 0 and case.path_parameters:
                for name in list(case.path_parameters):
                    if name in world.known:
                        case.path_parameters[name] = world.known[name]
            tried += 1
            per_op[label] = per_op.get(label, 0) + 1
            try:
                response = case.call(headers=world.headers, timeout=REQUEST_TIMEOUT_S)
            except Exception as exc:
                server_errors.append(f"{label}: no response: {exc!r}")
                return
            if response.status_code >= 500:
                server_errors.append(
                    f"{label}: {response.status_code} {response.text[:300]} <- {case.as_curl_command()[:400]}"
                )
                return
            try:
                case.validate_response(response, excluded_checks=excluded)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # schemathesis raises an exception group
                violations.append(
                    f"{label}: {_failure_title(exc)} ({response.status_code} "
                    f"{response.text[:160]!r} <- {case.as_curl_command()[:300]})"
                )

        check()

    for operation in operations:
        try:
            walk(operation)
        except Exception as exc:  # a strategy hypothesis cannot draw from
            result.problems.append(f"{operation.label}: the walk failed: {exc!r}"[:400])
    result.problems += server_errors
    # a response outside the schema (or a schema-valid request refused) fails the suite too
    result.problems += sorted(set(violations))
    result.figures = {
        "operations": len(operations),
        "cases": tried,
        "server_errors": len(server_errors),
        "schema_violations": len(violations),
        "seconds": time.monotonic() - t0,
    }
    result.line = (
        f"schemathesis: operations {len(operations)}, cases {tried}, server errors "
        f"{len(server_errors)}, schema violations {len(violations)}"
    )
    return result
