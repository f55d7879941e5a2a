"""Runs and projects: create, status, config merge, reads; the run row every other part checks or locks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, bindparam, func, select, update
from sqlalchemy.sql.expression import BindParameter

from mhpo_server.schemas import Project, Run, RunCreate
from mhpo_server.store.base import Conflict, NotFound, OverLimit
from mhpo_server.store.engine import Database, Part, dumps
from mhpo_server.store.models import EventRow, ProjectRow, RunRow

OPEN_SEVERITIES = ("warning", "critical")


class Runs(Part):
    def __init__(self, db: Database) -> None:
        super().__init__(db)
        # Statements of the hot paths, built once: building one costs more than running it on SQLite.
        rid: BindParameter[str] = bindparam("rid")
        self._run_by_id = self._run_select().where(RunRow.run_id == rid)
        self._run_exists = select(RunRow.run_id).where(RunRow.run_id == rid)
        lock = select(RunRow.last_step, RunRow.evaluated_step, RunRow.write_seq).where(RunRow.run_id == rid)
        self._lock = lock.with_for_update() if self.dialect == "postgresql" else lock
        self.touch = update(RunRow).where(RunRow.run_id == rid)

    def _run_select(self) -> Any:
        open_flags = (
            select(func.count())
            .where(EventRow.run_id == RunRow.run_id, EventRow.severity.in_(OPEN_SEVERITIES))
            .scalar_subquery()
        )
        return select(
            RunRow.run_id,
            ProjectRow.name.label("project"),
            RunRow.name,
            RunRow.loss,
            RunRow.config,
            RunRow.status,
            RunRow.created_at,
            RunRow.updated_at,
            RunRow.last_step,
            RunRow.last_seen_at,
            open_flags.label("open_flags"),
            RunRow.parent_run_id,
            RunRow.fork_step,
        ).join(ProjectRow, ProjectRow.id == RunRow.project_id)

    @staticmethod
    def _to_run(row: Any) -> Run:
        return Run(**row._mapping)

    def fetch(self, conn: Connection, run_id: str) -> Run:
        row = conn.execute(self._run_by_id, {"rid": run_id}).first()
        if row is None:
            raise NotFound.run(run_id)
        return self._to_run(row)

    def create_run(self, run: RunCreate) -> Run:
        now = time.time()
        run_id = str(run.run_id or uuid.uuid4())
        with self._tx(write=True) as conn:
            conn.execute(
                self._insert(ProjectRow.__table__)
                .values(name=run.project, created_at=now)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            project_id = conn.execute(select(ProjectRow.id).where(ProjectRow.name == run.project)).scalar_one()
            inserted = conn.execute(
                self._insert(RunRow.__table__)
                .values(
                    run_id=run_id,
                    project_id=project_id,
                    name=run.name,
                    loss=run.loss,
                    config=run.config,
                    status="running",
                    created_at=now,
                    updated_at=now,
                )
                .on_conflict_do_nothing(index_elements=["run_id"])
                .returning(RunRow.run_id)
            ).first()
            existing = self.fetch(conn, run_id)
        if inserted is None and (existing.project, existing.name) != (run.project, run.name):
            # Says nothing of the other run (its name or project could be another team's).
            raise Conflict(f"run_id {run_id} is already taken by another run: omit run_id to get a fresh one")
        return existing

    def update_run(self, run_id: str, status: str) -> Run:
        with self._tx(write=True) as conn:
            done = conn.execute(
                update(RunRow)
                .where(RunRow.run_id == run_id)
                .values(status=status, updated_at=time.time())
                .returning(RunRow.run_id)
            ).first()
            if done is None:
                raise NotFound.run(run_id)
            return self.fetch(conn, run_id)

    def merge_config(self, run_id: str, values: Mapping[str, Any], max_bytes: int | None = None) -> Run:
        with self._tx(write=True) as conn:
            self.lock(conn, run_id)  # the row stays held until commit: no other merge reads it meanwhile
            config = dict(conn.execute(select(RunRow.config).where(RunRow.run_id == run_id)).scalar_one() or {})
            for key, value in values.items():
                stored = config.get(key)
                config[key] = {**stored, **value} if isinstance(stored, dict) and isinstance(value, dict) else value
            if max_bytes is not None:
                size = len(dumps(config).encode("utf-8", "surrogatepass"))
                if size > max_bytes:
                    raise OverLimit(
                        ("config",),
                        f"the run's config would have {size} bytes of JSON, more than the limit of {max_bytes} "
                        "(MHPO_MAX_CONFIG_BYTES): log fewer or shorter params and tags",
                    )
            conn.execute(update(RunRow).where(RunRow.run_id == run_id).values(config=config, updated_at=time.time()))
            return self.fetch(conn, run_id)

    def get_run(self, run_id: str) -> Run:
        with self._tx() as conn:
            return self.fetch(conn, run_id)

    def list_runs(self, project: str | None = None) -> list[Run]:
        query = self._run_select().order_by(RunRow.created_at.desc())
        if project is not None:
            query = query.where(ProjectRow.name == project)
        with self._tx() as conn:
            return [self._to_run(row) for row in conn.execute(query)]

    def list_projects(self) -> list[Project]:
        query = (
            select(ProjectRow.name, func.count(RunRow.run_id).label("runs"), ProjectRow.created_at)
            .outerjoin(RunRow, RunRow.project_id == ProjectRow.id)
            .group_by(ProjectRow.id, ProjectRow.name, ProjectRow.created_at)
            .order_by(ProjectRow.name)
        )
        with self._tx() as conn:
            return [Project(**row._mapping) for row in conn.execute(query)]

    def lock(self, conn: Connection, run_id: str) -> tuple[int | None, int | None, int]:
        """The run's last step, evaluation position and history change count (`write_seq`), locking its
        row on PostgreSQL so writers to one run take turns.

        (SQLite's BEGIN IMMEDIATE already serialises writers.) Taking turns keeps the
        "newer than last_step" fast path of `write_records` exact under concurrency.
        """
        row = conn.execute(self._lock, {"rid": run_id}).first()
        if row is None:
            raise NotFound.run(run_id)
        return row[0], row[1], int(row[2])

    def evaluation_position(self, run_id: str) -> tuple[int | None, int | None]:
        with self._tx() as conn:
            row = conn.execute(self._lock, {"rid": run_id}).first()
        if row is None:
            raise NotFound.run(run_id)
        return row[1], row[0]

    def behind(self, limit: int = 1000) -> list[tuple[str, int | None, int]]:
        query = (
            select(RunRow.run_id, RunRow.evaluated_step, RunRow.last_step)
            .where(RunRow.last_step.is_not(None), func.coalesce(RunRow.evaluated_step, -1) < RunRow.last_step)
            .order_by(RunRow.last_seen_at)
            .limit(limit)
        )
        with self._tx() as conn:
            return [
                (run_id, evaluated, int(last)) for run_id, evaluated, last in conn.execute(query) if last is not None
            ]

    def require(self, conn: Connection, run_id: str) -> None:
        if conn.execute(self._run_exists, {"rid": run_id}).first() is None:
            raise NotFound.run(run_id)
