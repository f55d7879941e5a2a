"""The dashboard's only door to the data: a small synchronous client of the HTTP query API.

The dashboard never opens the database, so it works the same against the server it is
mounted in and against a remote one. Exceptions:

    ApiError            any non-2xx answer or transport failure (status 0 for the latter)
    └── NotAvailable    the route is absent (404 on a collection), e.g. alerts before they ship
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

__all__ = ["MAX_PARALLEL_READS", "ApiClient", "ApiError", "NotAvailable", "key_chunks", "numbers", "parallel"]

# One scalars request carries at most this many keys (the API takes 1,000 by default) and this
# many characters of them (a long query string is refused before the API sees it).
MAX_KEYS_PER_REQUEST = 500
MAX_KEY_CHARS_PER_REQUEST = 6_000
# Reads one `parallel` call runs at once, however many it is given: a page's cost in threads
# stays bounded whatever its URL asks for.
MAX_PARALLEL_READS = 8


def key_chunks(
    keys: list[str], max_keys: int = MAX_KEYS_PER_REQUEST, max_chars: int = MAX_KEY_CHARS_PER_REQUEST
) -> list[list[str]]:
    """`keys` split, in order, into groups small enough for one request each."""
    chunks: list[list[str]] = [[]]
    chars = 0
    for key in keys:
        if chunks[-1] and (len(chunks[-1]) >= max_keys or chars + len(key) + len("&key=") > max_chars):
            chunks.append([])
            chars = 0
        chunks[-1].append(key)
        chars += len(key) + len("&key=")
    return chunks


def numbers(values: list[Any]) -> list[Any]:
    """Numbers of an answer as floats: the API writes NaN and +-Infinity as the strings "NaN",
    "Infinity", "-Infinity" (strict JSON), which `float` reads back."""
    return [float(v) if isinstance(v, str) else v for v in values]


def _series_numbers(answer: dict[str, Any]) -> dict[str, Any]:
    for series in answer.get("series", {}).values():
        for field in ("value", "min", "max"):
            series[field] = numbers(series[field])
    return answer


def parallel(*calls: Callable[[], Any]) -> list[Any]:
    """Run independent API reads, at most MAX_PARALLEL_READS at once (a page needs several); the first error is raised.

    A pool per call (not a shared one) so nested calls can never wait on each other.
    """
    workers = max(1, min(len(calls), MAX_PARALLEL_READS))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mhpo-dashboard-api") as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


class ApiError(RuntimeError):
    """The API answered with an error status or could not be reached."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message


class NotAvailable(ApiError):
    """The server does not offer this route (HTTP 404 on a collection path)."""


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _detail(response: httpx.Response) -> str:
    """The server's error detail; FastAPI's validation list becomes `field.path: message; ...`."""
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        return response.text
    if isinstance(detail, list):
        return "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', '')}" if isinstance(d, dict) else str(d)
            for d in detail
        )
    return str(detail)


class ApiClient:
    """Typed-ish wrappers over GET/POST of `/api/v1/...`; returns decoded JSON (NaN kept as float).

    `token` is sent as `Authorization: Bearer`; `as_viewer(token)` gives a client for one
    viewer's token over the same connection pool (the dashboard's login sends each viewer's own).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = 15.0,
        transport: httpx.BaseTransport | None = None,
        *,
        http: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http or httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)
        self._headers = _bearer(token)

    def as_viewer(self, token: str | None) -> ApiClient:
        """This client with `token` instead of its own (sharing connections; closing it is the owner's job)."""
        return ApiClient(self.base_url, token, http=self._http)

    def close(self) -> None:
        self._http.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        missing_is_unavailable: bool = False,
    ) -> Any:
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(method, path, params=clean, json=json, headers=self._headers)
        except httpx.HTTPError as exc:
            raise ApiError(0, f"cannot reach the API at {self.base_url}{path}: {exc}") from exc
        if response.status_code == 404 and missing_is_unavailable:
            raise NotAvailable(404, f"{path} is not offered by the server at {self.base_url}")
        if response.status_code >= 400:
            raise ApiError(response.status_code, f"{method} {path}: {_detail(response)}")
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # auth --------------------------------------------------------------------------------
    def whoami(self) -> dict[str, Any]:
        """`{"auth", "project", "scope"}` of this client's token (401 ApiError: unknown or revoked)."""
        return self._request("GET", "/api/v1/auth/whoami")

    # runs --------------------------------------------------------------------------------
    def runs(self, project: str | None = None) -> list[dict[str, Any]]:
        return self._request("GET", "/api/v1/runs", params={"project": project})["runs"]

    def run(self, run_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/v1/runs/{run_id}")

    def keys(self, run_id: str) -> dict[str, list[str]]:
        return self._request("GET", f"/api/v1/runs/{run_id}/keys")

    def scalars(
        self,
        run_id: str,
        keys: Iterable[str],
        start: int | None = None,
        end: int | None = None,
        max_points: int | None = None,
    ) -> dict[str, Any]:
        """`{"downsampled", "series": {key: {"step", "value", "min", "max"}}}`; no keys, no request.

        Many keys are read in several requests at once (see `key_chunks`) and merged.
        """
        key_list = list(dict.fromkeys(keys))
        if not key_list:
            return {"run_id": run_id, "downsampled": False, "series": {}}

        def read(chunk: list[str]) -> dict[str, Any]:
            # One `key=` per key: a key may hold a comma, which `keys=a,b` would split.
            params = {"key": chunk, "start": start, "end": end, "max_points": max_points}
            return _series_numbers(self._request("GET", f"/api/v1/runs/{run_id}/scalars", params=params))

        chunks = key_chunks(key_list)
        if len(chunks) == 1:
            return read(chunks[0])
        parts = parallel(*[lambda c=c: read(c) for c in chunks])
        return {
            "run_id": run_id,
            "downsampled": any(p.get("downsampled") for p in parts),
            "series": {k: v for p in parts for k, v in p["series"].items()},
        }

    def histograms(
        self, run_id: str, key: str, start: int | None = None, end: int | None = None, max_steps: int | None = None
    ) -> dict[str, Any]:
        params = {"start": start, "end": end, "max_steps": max_steps}
        answer = self._request("GET", f"/api/v1/runs/{run_id}/histograms/{key}", params=params)
        for field in ("min", "max", "sum", "sumsq"):
            answer[field] = numbers(answer[field])
        return answer

    def outliers(self, run_id: str, step: int) -> dict[str, Any]:
        answer = self._request("GET", f"/api/v1/runs/{run_id}/outliers", params={"step": step})
        for outlier in answer["outliers"]:
            for field in ("x", "A", "zeta"):
                if isinstance(outlier.get(field), str):
                    outlier[field] = float(outlier[field])
        return answer

    def events(self, run_id: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/api/v1/runs/{run_id}/events")["events"]

    def events_after(self, run_id: str, cursor: str | None) -> dict[str, Any]:
        """`{"events", "cursor", "reset"}`: the events newer than `cursor` ("" or None: all of them).

        `reset` means the run was rewound meanwhile and `events` is its whole list. A server
        without cursors answers every event and no cursor; the caller de-duplicates by id.
        """
        body = self._request("GET", f"/api/v1/runs/{run_id}/events", params={"after": cursor or ""})
        return {"events": body["events"], "cursor": body.get("cursor"), "reset": bool(body.get("reset"))}

    def forecast(self, run_id: str) -> dict[str, Any]:
        """The entropy forecast at the run's latest rollout (`steps_left`, `fraction`, ...; `reason` when none)."""
        return self._request("GET", f"/api/v1/runs/{run_id}/forecast")

    def flag_kinds(self) -> list[str]:
        """The kinds a flag may have, as the server's detectors name them."""
        return self._request("GET", "/api/v1/flag-kinds", missing_is_unavailable=True)["kinds"]

    # alerts (absent on older servers) --------------------------------------------------------
    def alert_rules(self) -> list[dict[str, Any]]:
        body = self._request("GET", "/api/v1/alert-rules", missing_is_unavailable=True)
        return body["rules"] if isinstance(body, dict) else body

    def create_alert_rule(self, rule: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/api/v1/alert-rules", json=rule, missing_is_unavailable=True)

    def update_alert_rule(self, rule_id: int | str, changes: dict[str, Any]) -> dict[str, Any]:
        return self._request("PATCH", f"/api/v1/alert-rules/{rule_id}", json=changes)

    def delete_alert_rule(self, rule_id: int | str) -> None:
        self._request("DELETE", f"/api/v1/alert-rules/{rule_id}")

    def alerts(self) -> list[dict[str, Any]]:
        body = self._request("GET", "/api/v1/alerts", missing_is_unavailable=True)
        return body["alerts"] if isinstance(body, dict) else body

    def acknowledge_alert(self, alert_id: int | str) -> dict[str, Any]:
        return self._request("POST", f"/api/v1/alerts/{alert_id}/ack")
