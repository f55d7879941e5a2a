"""The API client's error mapping: what each page shows when the server says no or is gone."""

from __future__ import annotations

import httpx
import pytest

from mhpo_dashboard.api import ApiClient, ApiError, NotAvailable, parallel
from tests.fixtures.server import free_port


def _client(status: int, body: object) -> ApiClient:
    return ApiClient("http://api.test", transport=httpx.MockTransport(lambda _req: httpx.Response(status, json=body)))


def test_a_server_without_the_alert_routes_is_reported_as_not_available() -> None:
    with pytest.raises(NotAvailable, match="/api/v1/alert-rules is not offered"):
        _client(404, {"detail": "Not Found"}).alert_rules()


def test_validation_errors_name_the_field() -> None:
    body = {"detail": [{"loc": ["body", "condition", "value"], "msg": "Input should be a valid number"}]}
    with pytest.raises(ApiError, match=r"422: POST /api/v1/alert-rules: body.condition.value: Input should be") as err:
        _client(422, body).create_alert_rule({"name": "x"})
    assert not isinstance(err.value, NotAvailable)


def test_an_unknown_run_is_an_error_not_a_missing_feature() -> None:
    with pytest.raises(ApiError) as err:
        _client(404, {"detail": "run r not found"}).run("r")
    assert err.value.status == 404 and not isinstance(err.value, NotAvailable)


def test_an_unreachable_server_is_status_0_with_its_address() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ApiError, match=f"cannot reach the API at {url}") as err:
        ApiClient(url, timeout=2).runs()
    assert err.value.status == 0


def test_parallel_keeps_order_and_raises_the_first_error() -> None:
    assert parallel(lambda: 1, lambda: 2, lambda: 3) == [1, 2, 3]
    with pytest.raises(ZeroDivisionError):
        parallel(lambda: 1, lambda: 1 / 0)
