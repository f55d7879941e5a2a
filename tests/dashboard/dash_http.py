"""Dash callbacks over plain HTTP, as the browser's renderer sends them (no browser needed).

`route(client, path)` asks Dash's page router for a page, as a navigation does, and returns
the answer and the page's components (`id -> props`); `fire(client, output, components)` then
sends the callback whose output string contains `output`, with its inputs and state taken
from those components (pattern-matching ids expand to every matching component).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

Components = dict[str, dict[str, Any]]


def _key(component_id: str | dict[str, Any]) -> str:
    return component_id if isinstance(component_id, str) else json.dumps(component_id, sort_keys=True)


def _walk(tree: Any) -> Iterator[dict[str, Any]]:
    if isinstance(tree, list):
        for item in tree:
            yield from _walk(item)
    elif isinstance(tree, dict):
        props = tree.get("props")
        if isinstance(props, dict):
            if "id" in props:
                yield props
            for value in props.values():
                yield from _walk(value)


def components(tree: Any) -> Components:
    """Every component with an id in a layout tree, by id (dict ids as sorted JSON)."""
    return {_key(props["id"]): props for props in _walk(tree)}


def dependencies(client: httpx.Client) -> list[dict[str, Any]]:
    answer = client.get("/_dash-dependencies")
    answer.raise_for_status()
    return answer.json()


def _matching(pattern: str, found: Components) -> list[dict[str, Any]]:
    """Components whose dict id matches a wildcard id such as {"name": ["ALL"], "type": "run-graph"}."""
    wanted = json.loads(pattern)
    fixed = {k: v for k, v in wanted.items() if v != ["ALL"]}
    out = []
    for props in found.values():
        cid = props["id"]
        if isinstance(cid, dict) and set(cid) == set(wanted) and all(cid[k] == v for k, v in fixed.items()):
            out.append(props)
    return out


def _values(items: list[dict[str, Any]], found: Components) -> list[Any]:
    values: list[Any] = []
    for item in items:
        if item["id"].startswith("{"):
            values.append(
                [
                    {"id": p["id"], "property": item["property"], "value": p.get(item["property"])}
                    for p in _matching(item["id"], found)
                ]
            )
        else:
            props = found.get(item["id"], {})
            values.append({"id": item["id"], "property": item["property"], "value": props.get(item["property"])})
    return values


def _outputs(output: str, found: Components) -> list[Any]:
    parts = output.strip(".").split("...") if output.startswith("..") else [output]
    outputs: list[Any] = []
    for part in parts:
        component_id, prop = part.rsplit(".", 1)
        if component_id.startswith("{"):
            outputs.append([{"id": p["id"], "property": prop} for p in _matching(component_id, found)])
        else:
            outputs.append({"id": component_id, "property": prop})
    return outputs


def fire(client: httpx.Client, output: str, found: Components) -> httpx.Response:
    """POST the callback whose output contains `output`, with values from `found`; all its inputs count as changed."""
    deps = [d for d in dependencies(client) if output in d["output"]]
    assert len(deps) == 1, f"{len(deps)} callbacks output {output!r}"
    dep = deps[0]
    body = {
        "output": dep["output"],
        "outputs": _outputs(dep["output"], found),
        "inputs": _values(dep["inputs"], found),
        "state": _values(dep["state"], found),
        "changedPropIds": [f"{i['id']}.{i['property']}" for i in dep["inputs"]],
    }
    return client.post("/_dash-update-component", json=body)


def route(client: httpx.Client, path: str) -> tuple[httpx.Response, Components]:
    """Dash's page router for `path` (what a navigation asks); the answer and the page's components."""
    pathname, _, search = path.partition("?")
    found: Components = {
        "_pages_location": {"id": "_pages_location", "pathname": pathname, "search": f"?{search}" if search else ""},
    }
    answer = fire(client, "_pages_content.children", found)
    if answer.status_code == 200:
        found |= components(answer.json()["response"]["_pages_content"]["children"])
    return answer, found
