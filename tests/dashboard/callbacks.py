"""Calling the dashboard's Dash callbacks over HTTP, as the browser's renderer does.

`route` asks for a page (Dash's page-routing callback); `call` posts any callback by its
output and input ids, with the values given. No browser: the tests read the JSON answer.
"""

from __future__ import annotations

from typing import Any

import httpx


def dependencies(client: httpx.Client) -> list[dict[str, Any]]:
    answer = client.get("/_dash-dependencies")
    assert answer.status_code == 200, answer.text
    return list(answer.json())


def _ids(spec: str) -> list[dict[str, str]]:
    """`..a.b...c.d..` (or `a.b`) -> [{"id": "a", "property": "b"}, ...]."""
    parts = spec.strip(".").split("...")
    return [{"id": p.rsplit(".", 1)[0], "property": p.rsplit(".", 1)[1]} for p in parts]


def call(
    client: httpx.Client, output: str, values: dict[str, Any], changed: str | None = None, **headers: str
) -> httpx.Response:
    """Post the callback whose output spec contains `output`; `values` by "id.property" for its inputs and states."""
    dep = next(d for d in dependencies(client) if output in d["output"])
    outputs = _ids(dep["output"])
    body = {
        "output": dep["output"],
        "outputs": outputs if len(outputs) > 1 or dep["output"].startswith("..") else outputs[0],
        "inputs": [{**i, "value": values.get(f"{i['id']}.{i['property']}")} for i in dep["inputs"]],
        "state": [{**s, "value": values.get(f"{s['id']}.{s['property']}")} for s in dep["state"]],
        "changedPropIds": [changed or f"{dep['inputs'][0]['id']}.{dep['inputs'][0]['property']}"],
    }
    return client.post("/_dash-update-component", json=body, headers=headers)


def route(client: httpx.Client, pathname: str, search: str = "") -> httpx.Response:
    """Dash's page-routing callback for `pathname` and `search`: what the browser asks to render a page."""
    return call(
        client,
        "_pages_content.children",
        {"_pages_location.pathname": pathname, "_pages_location.search": search},
        changed="_pages_location.pathname",
    )
