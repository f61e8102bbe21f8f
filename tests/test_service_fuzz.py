"""Schemathesis against the live service's OpenAPI schema: whatever it sends, no 5xx."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from servers import uvicorn_thread

from routescan.service.app import create_app
from routescan.service.settings import ServiceSettings


def test_no_server_errors_on_any_operation(tmp_path, test_detector) -> None:
    app = create_app(ServiceSettings(db=tmp_path / "audit.sqlite3", max_batch=4), detector=test_detector)
    with uvicorn_thread(app) as base:
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/score", "/v1/score/batch", "/v1/audits", "/metrics"}
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case) -> None:
                case.call_and_validate(checks=[not_a_server_error], timeout=10)

            check()
