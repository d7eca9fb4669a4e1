"""Schema fuzzing: schemathesis generates requests from the service's own /openapi.json for every /v1
route, valid ones and ones the schema forbids, and sends them over real HTTP to uvicorn with real Redis
and the real model. No answer may be a 5xx, a forbidden request must get a 4xx, and every answer must
be one the document declares: its status code, content type, headers and body schema. A bounded,
derandomized number of examples per route keeps it to seconds and reproducible.

(Driven through hypothesis directly: schemathesis' pytest plugin still writes `Function._nodeid`,
which pytest 9 removed.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from service_support import make_settings, uvicorn_app

from service.main import create_app
from service.settings import Settings

EXAMPLES = 40  # per route, method and mode
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,  # a request the schema forbids must get a 4xx, never a 2xx
]
# Every /v1 operation, read from the app's document at collection (no model is loaded for that).
_DOCUMENT = create_app(Settings(_env_file=None, redis_url="redis://unused")).openapi()
OPERATIONS = [
    (method.upper(), path)
    for path, item in _DOCUMENT["paths"].items()
    if path.startswith("/v1/")
    for method in item
]


@pytest.fixture(scope="module")
def api_schema(redis_url: str) -> Iterator[schemathesis.BaseSchema]:
    with uvicorn_app(make_settings(redis_url)) as (_, url):
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_every_v1_route_is_fuzzed() -> None:
    assert {path for _, path in OPERATIONS} >= {"/v1/score", "/v1/rerank", "/v1/users/{user_id}/events"}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_v1_routes_answer_only_what_their_schema_declares(
    api_schema: schemathesis.BaseSchema, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS, timeout=30)

    check()
