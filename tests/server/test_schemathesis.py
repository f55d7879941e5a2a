"""Property-based fuzzing of every operation in /openapi.json over a real app and database: never a 5xx.

Bounded (a fixed number of examples per operation) to fit the suite's time budget. Most
cases target a real run with data, so the fuzzed inputs reach the store, not only a 404.
"""

from __future__ import annotations

import math
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, positive_data_acceptance

from mhpo_server.app import create_app
from mhpo_server.config import Settings
from mhpo_server.store import open_store
from tests.server.conftest import new_run, post_json

MAX_EXAMPLES = 8


@pytest.fixture
def fuzz_target(migrated_url: str) -> Iterator[tuple[FastAPI, str]]:
    app = create_app(Settings(db=migrated_url, dashboard=False))
    with TestClient(app) as client:
        run_id = new_run(client)
        records = [
            {
                "step": s,
                "scalars": {"a": float(s), "b": math.nan},
                "histograms": {"h": {"lo": 0.0, "hi": 1.0, "counts": [s, 1]}},
                "outliers": [{"sample": 0, "position": s, "x": 0.1, "A": 1.0}],
            }
            for s in range(20)
        ]
        assert (
            post_json(client, f"/api/v1/runs/{run_id}/records", {"batch_id": "seed", "records": records}).status_code
            == 200
        )
        yield app, run_id


def test_no_server_errors(fuzz_target: tuple[FastAPI, str]) -> None:
    """Positive and negative cases for every operation; any 5xx fails with the request that caused it."""
    app, run_id = fuzz_target
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def fuzz(case: schemathesis.Case) -> None:
                if "run_id" in (case.path_parameters or {}) and uuid.uuid5(uuid.NAMESPACE_OID, repr(case.body)).int % 4:
                    case.path_parameters["run_id"] = run_id
                case.call_and_validate(checks=[not_a_server_error])

            try:
                fuzz()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.label  # nothing to get wrong in /healthz


# Refusals of schema-valid requests that the schema cannot express (each is documented in
# docs/security.md, "Input limits, storage faults and secrets"): a rule across fields or a rule
# on stored data, a server limit (named by its MHPO_MAX_* setting), and text no database can store (a NUL character, a lone surrogate)
# anywhere in a free-form config. PUT .../flag-params takes a partial, nested set of
# detector parameters that the schema states only as an object.
DOCUMENTED_REFUSALS = re.compile(
    r"lo must be < hi|is after end|webhook_url: required|binning .* differs|is not a run of project"
    r"|contains a NUL character|contains a lone surrogate|nested deeper than|keys exceed the limit|must be 1-250 characters"
    r"|is past the run's last logged step|\(MHPO_MAX_[A-Z_]+\)|is not an events cursor"
)
PARTIAL_BODIES = {"PUT /api/v1/projects/{project}/flag-params"}
EVERY_CHECK = [check for check in schemathesis.checks.CHECKS.get_all() if check is not positive_data_acceptance]


def test_every_check_auth_off(migrated_url: str) -> None:
    """Every schemathesis check on SQLite and PostgreSQL: the schema and the server agree (documented refusals aside)."""
    every_check(migrated_url, auth=False)


def test_every_check_auth_on(sqlite_template: Path, tmp_path: Path) -> None:
    """The same with auth on (a project's write token; the auth checks send none or a wrong one)."""
    shutil.copyfile(sqlite_template, tmp_path / "mhpo.db")
    every_check(f"sqlite:///{tmp_path / 'mhpo.db'}", auth=True)


def every_check(migrated_url: str, auth: bool) -> None:
    store = open_store(migrated_url)
    try:
        token = store.create_token("p", "write")
    finally:
        store.close()
    headers = {"Authorization": f"Bearer {token}"} if auth else {}
    app = create_app(Settings(db=migrated_url, auth=auth, dashboard=False))
    with TestClient(app) as client:
        created = post_json(client, "/api/v1/runs", {"project": "p", "name": "r"}, headers=headers)
        run_id = created.json()["run_id"]
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        for operation in (result.ok() for result in schema.get_all_operations()):
            known_query = {p.name for p in operation.query}
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(
                    max_examples=MAX_EXAMPLES,
                    deadline=None,
                    derandomize=True,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                def fuzz(case: schemathesis.Case) -> None:
                    if (
                        mode is GenerationMode.POSITIVE
                        and "run_id" in (case.path_parameters or {})
                        and uuid.uuid5(uuid.NAMESPACE_OID, repr(case.body)).int % 4
                    ):
                        case.path_parameters["run_id"] = run_id
                    if case.query:  # unknown query parameters are ignored, as documented
                        case.query = {k: v for k, v in case.query.items() if k in known_query}
                    # A negative case without the Authorization header tests that it is required: send none.
                    sent = headers if mode is GenerationMode.POSITIVE or "Authorization" in (case.headers or {}) else {}
                    response = case.call(headers=sent)
                    case.validate_response(response, checks=EVERY_CHECK, headers=sent)
                    if (
                        mode is GenerationMode.POSITIVE
                        and response.status_code == 422
                        and operation.label not in PARTIAL_BODIES
                    ):
                        assert DOCUMENTED_REFUSALS.search(response.text), (operation.label, case.body, response.text)

                try:
                    fuzz()
                except Unsatisfiable:
                    assert mode is GenerationMode.NEGATIVE, operation.label
