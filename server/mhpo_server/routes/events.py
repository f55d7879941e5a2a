"""GET /api/v1/runs/{run_id}/events: flags, plus whatever `app.state.event_sources` add (fired alerts).

`?after=<cursor>` is the incremental form a live page polls with: only the events it does not
hold yet, and a `cursor` for the next read (`after=` with nothing starts from the beginning).
Per source the cursor holds the largest id read so far and the ids of the rows created in the
last `OVERLAP_S` seconds (`flag:12.11.12,alert:7,rewinds:1`). Ids come from one sequence, but
on PostgreSQL a row can commit after a row with a larger id; such a row is recent, so each read
also looks at the recent rows and returns those the cursor does not list.

A rewind deletes flags and marks alerts rewound, changing events the reader holds, and SQLite
may give the deleted flags' ids to new rows. So the cursor also counts the run's rewinds; when
the count moved, the answer is the whole list with `"reset": true`: the reader replaces what it
holds.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from mhpo_server.deps import ReadAccess, StoreDep
from mhpo_server.responses import NaNJSONResponse
from mhpo_server.routes.runs import authorized_run
from mhpo_server.schemas import EventList
from mhpo_server.store import Invalid, Store

router = APIRouter(prefix="/api/v1/runs", tags=["events"])

FLAGS = "flag"  # the cursor's name for the store's own events (flags, rewinds, forks)
REWINDS = "rewinds"  # the cursor's count of the run's rewinds
OVERLAP_S = 10.0  # longer than a write transaction takes from taking its row's id to committing
MAX_RECENT_IDS = 100  # per source in a cursor; beyond it the oldest recent rows may come back twice
MAX_CURSOR_LENGTH = 8192  # a few sources of MAX_RECENT_IDS ids each


@dataclass(frozen=True)
class EventSource:
    """More items of a run's events, e.g. fired alerts.

    `read(store, run_id, after_id, since)` returns dicts with at least "type", "id", "step" and
    "created_at": all of them when `after_id` is None, else those with an id above it or created
    at or after `since`. `name` keys the source's ids in a cursor.
    """

    name: str
    read: Callable[[Store, str, int | None, float | None], list[dict[str, Any]]]


@dataclass
class Position:
    """How far a reader has read one source: the largest id, and the recent ids it holds."""

    last_id: int = 0
    recent: frozenset[int] = frozenset()


def parse_cursor(after: str) -> dict[str, Position]:
    """`flag:12.11.12,alert:7` -> {"flag": Position(12, {11, 12}), "alert": Position(7)}."""
    found: dict[str, Position] = {}
    for part in filter(None, after.split(",")):
        name, _, ids = part.partition(":")
        numbers = ids.split(".")
        if not name or not all(n.isdigit() and len(n) <= 18 for n in numbers):  # ids fit a 64-bit integer
            raise Invalid(
                ("after",),
                f"{after!r} is not an events cursor; pass the `cursor` of the previous answer, or nothing to start",
            )
        found[name] = Position(int(numbers[0]), frozenset(int(n) for n in numbers[1:]))
    return found


def _advance(at: Position, rows: list[dict[str, Any]], since: float) -> tuple[list[dict[str, Any]], Position]:
    """The rows the reader does not hold, and its position after reading them."""
    new = [r for r in rows if r.get("id") not in at.recent]
    ids = [r["id"] for r in rows if isinstance(r.get("id"), int)]
    recent = sorted(r["id"] for r in rows if isinstance(r.get("id"), int) and (r.get("created_at") or 0.0) >= since)
    return new, Position(max([at.last_id, *ids]), frozenset(recent[-MAX_RECENT_IDS:]))


def _format(cursor: dict[str, Position]) -> str:
    return ",".join(f"{name}:{'.'.join(str(i) for i in [p.last_id, *sorted(p.recent)])}" for name, p in cursor.items())


@router.get("/{run_id}/events", response_model=EventList)
def list_events(
    run_id: uuid.UUID,
    request: Request,
    store: StoreDep,
    principal: ReadAccess,
    after: Annotated[
        str | None,
        Query(
            description="the `cursor` of the previous answer: only newer events (and a new cursor) come back",
            max_length=MAX_CURSOR_LENGTH,
        ),
    ] = None,
) -> NaNJSONResponse:
    """Sorted by step; without `after`, every event and no cursor."""
    if principal.project is not None:
        authorized_run(store, principal, run_id)
    rid = str(run_id)
    sources: list[EventSource] = [EventSource(FLAGS, _flags), *request.app.state.event_sources]
    events: list[dict[str, Any]] = []
    if after is None:
        for source in sources:
            events.extend(source.read(store, rid, None, None))
        return NaNJSONResponse({"events": _sorted(events)})
    return NaNJSONResponse(_since(store, rid, sources, parse_cursor(after), time.time() - OVERLAP_S))


def _since(
    store: Store, run_id: str, sources: list[EventSource], cursor: dict[str, Position], since: float
) -> dict[str, Any]:
    """The incremental answer; the whole list again (`reset`) when the run was rewound since the cursor's read."""
    events: list[dict[str, Any]] = []
    rewinds = cursor.pop(REWINDS, Position())
    for source in sources:
        at = cursor.get(source.name, Position())
        rows = source.read(store, run_id, at.last_id, since)
        if source.name == FLAGS:
            count = sum(1 for r in rows if r["type"] == "rewind")
            if cursor and rewinds.last_id != count:
                return {**_since(store, run_id, sources, {}, since), "reset": True}
            rewinds = Position(count)
            rows = [r for r in rows if r["type"] != "rewind" or r["id"] > at.last_id or r["created_at"] >= since]
        new, cursor[source.name] = _advance(at, rows, since)
        events.extend(new)
    return {"events": _sorted(events), "cursor": _format({**cursor, REWINDS: rewinds})}


def _flags(store: Store, run_id: str, after_id: int | None, since: float | None) -> list[dict[str, Any]]:
    return [e.model_dump() for e in store.list_events(run_id, after_id, since)]


def _sorted(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(events, key=lambda e: (e.get("step") or 0, e.get("created_at") or 0.0))
