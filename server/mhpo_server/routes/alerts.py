"""Alert rules (full CRUD), fired alerts (list, acknowledge) and per-project detector parameters.

Writes (rules, acknowledgements, parameters) need a write token when auth is on; a
project-scoped token only sees and changes its own project.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from pydantic import ValidationError

from mhpo_server.deps import AlertStoreDep, Principal, ReadAccess, StoreDep, WriteAccess
from mhpo_server.monitoring.listener import IngestMonitor
from mhpo_server.monitoring.schemas import (
    MAX_RULES_PER_PROJECT,
    Alert,
    AlertList,
    AlertRule,
    AlertRuleCreate,
    AlertRuleList,
    AlertRulePatch,
    FlagParamsOut,
)
from mhpo_server.monitoring.targets import TargetPolicy, TargetRefused
from mhpo_server.responses import NaNJSONResponse, respond
from mhpo_server.schemas import KEY_PATTERN
from mhpo_server.store import AlertStore, NotFound, Store

router = APIRouter(prefix="/api/v1", tags=["alerts"])


RuleId = Annotated[int, Path(ge=1, le=2**31 - 1)]
AlertId = Annotated[int, Path(ge=1, le=2**31 - 1)]
ProjectName = Annotated[str, Path(min_length=1, max_length=200, pattern=KEY_PATTERN)]
ProjectFilter = Annotated[str | None, Query(min_length=1, max_length=200, pattern=KEY_PATTERN)]
RunFilter = Annotated[str | None, Query(min_length=1, max_length=36, pattern=KEY_PATTERN)]
RowId = Annotated[int, Path(ge=1, le=2**31 - 1)]  # ids beyond the column's range are a 422, not a driver overflow


def mask_webhook(url: str) -> str:
    """Scheme and host only: a webhook URL's path and query are its secret (a Slack hook is a credential)."""
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]
    return f"{scheme}://{host}/***"


def _for(principal: Principal, rule: AlertRule) -> AlertRule:
    """The rule as this caller may see it: read tokens get the webhook URL masked."""
    if principal.scope == "write" or rule.webhook_url is None:
        return rule
    return rule.model_copy(update={"webhook_url": mask_webhook(rule.webhook_url)})


def _rule(alerts: AlertStore, rule_id: int, principal: Principal) -> AlertRule:
    """The rule if this caller may see it; another project's rule answers the 404 of an unknown id."""
    try:
        rule = alerts.get_rule(rule_id)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    if not principal.sees(rule.project):
        raise HTTPException(404, alerts.missing_rule(rule_id))
    return rule


def _alert(alerts: AlertStore, alert_id: int, principal: Principal) -> Alert:
    """The alert if this caller may see it; another project's alert answers the 404 of an unknown id."""
    try:
        alert = alerts.get_alert(alert_id)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    if not principal.sees(alert.project):
        raise HTTPException(404, alerts.missing_alert(alert_id))
    return alert


@router.post("/alert-rules", response_model=AlertRule, status_code=201)
def create_rule(
    body: AlertRuleCreate, request: Request, alerts: AlertStoreDep, store: StoreDep, principal: WriteAccess
) -> NaNJSONResponse:
    principal.check_project(body.project)
    _check_run_scope(store, body.project, body.run_id)
    _check_target(request.app.state.webhook_policy, body.webhook_url)
    if len(alerts.list_rules(body.project)) >= MAX_RULES_PER_PROJECT:
        raise HTTPException(
            422,
            [
                {
                    "loc": ["body", "project"],
                    "type": "value_error",
                    "msg": f"project {body.project!r} already has {MAX_RULES_PER_PROJECT} alert rules, the most it may have: "
                    "delete or edit one (PATCH /api/v1/alert-rules/{id})",
                }
            ],
        )
    return respond(alerts.create_rule(body), status_code=201)


def _check_target(policy: TargetPolicy, url: object) -> None:
    """A webhook URL the delivery would refuse is a 422 now (literal addresses, internal names, credentials)."""
    if url is None:
        return
    try:
        policy.check_url(str(url))
    except TargetRefused as exc:
        raise HTTPException(
            422,
            [{"loc": ["body", "webhook_url"], "type": "value_error", "msg": f"webhook_url {str(url)[:100]!r}: {exc}"}],
        ) from exc


def _check_run_scope(store: Store, project: str, run_id: str | None) -> None:
    """A rule scoped to a run must name an existing run of its project (422 otherwise, the same for
    an unknown run and another project's, so the answer tells nothing of other projects)."""
    if run_id is None:
        return
    try:
        found = store.get_run(run_id).project == project
    except NotFound:
        found = False
    if not found:
        raise HTTPException(
            422,
            [
                {
                    "loc": ["body", "run_id"],
                    "type": "value_error",
                    "msg": f"run_id {run_id!r} is not a run of project {project!r}: "
                    "name one of its runs (GET /api/v1/runs?project=...) or leave run_id null",
                }
            ],
        )


@router.get("/alert-rules", response_model=AlertRuleList)
def list_rules(
    alerts: AlertStoreDep, principal: ReadAccess, project: ProjectFilter = None, run_id: RunFilter = None
) -> NaNJSONResponse:
    """Rules of a project (or all); with `run_id`, the ones that apply to that run."""
    if principal.project is not None:
        project = project or principal.project
        principal.check_project(project)
    return respond(AlertRuleList(rules=[_for(principal, r) for r in alerts.list_rules(project, run_id)]))


@router.get("/alert-rules/{rule_id}", response_model=AlertRule)
def get_rule(rule_id: RowId, alerts: AlertStoreDep, principal: ReadAccess) -> NaNJSONResponse:
    return respond(_for(principal, _rule(alerts, rule_id, principal)))


@router.patch("/alert-rules/{rule_id}", response_model=AlertRule)
def update_rule(
    rule_id: RowId,
    body: AlertRulePatch,
    request: Request,
    alerts: AlertStoreDep,
    store: StoreDep,
    principal: WriteAccess,
) -> NaNJSONResponse:
    """Change any field but the project; `{"enabled": false}` disables a rule without losing it.

    A new `run_id` is checked as on create: a run of the rule's project.
    """
    rule = _rule(alerts, rule_id, principal)
    _check_run_scope(store, rule.project, body.run_id)
    _check_target(request.app.state.webhook_policy, body.webhook_url)
    try:
        return respond(alerts.update_rule(rule_id, body))
    except ValidationError as exc:
        detail = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise HTTPException(422, detail) from exc


@router.delete("/alert-rules/{rule_id}", status_code=204)
def delete_rule(rule_id: RowId, alerts: AlertStoreDep, principal: WriteAccess) -> Response:
    """Fired alerts of the rule stay (with its name) so the history is kept."""
    _rule(alerts, rule_id, principal)
    alerts.delete_rule(rule_id)
    return Response(status_code=204)


@router.get("/alerts", response_model=AlertList)
def list_alerts(
    alerts: AlertStoreDep,
    principal: ReadAccess,
    project: ProjectFilter = None,
    run_id: RunFilter = None,
    acknowledged: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> NaNJSONResponse:
    """Fired alerts, newest first."""
    if principal.project is not None:
        project = project or principal.project
        principal.check_project(project)
    return respond(AlertList(alerts=alerts.list_alerts(project, run_id, acknowledged, limit)))


@router.get("/alerts/{alert_id}", response_model=Alert)
def get_alert(alert_id: RowId, alerts: AlertStoreDep, principal: ReadAccess) -> NaNJSONResponse:
    return respond(_alert(alerts, alert_id, principal))


@router.post("/alerts/{alert_id}/ack", response_model=Alert)
def acknowledge(alert_id: RowId, alerts: AlertStoreDep, principal: WriteAccess) -> NaNJSONResponse:
    """Idempotent: acknowledging twice keeps the first time."""
    _alert(alerts, alert_id, principal)
    return respond(alerts.acknowledge(alert_id))


@router.get("/projects/{project}/flag-params", response_model=FlagParamsOut)
def get_flag_params(
    project: ProjectName, request: Request, alerts: AlertStoreDep, principal: ReadAccess
) -> NaNJSONResponse:
    """The project's overrides and the effective detector parameters."""
    principal.check_project(project)
    monitor: IngestMonitor = request.app.state.flag_monitor
    overrides = alerts.get_flag_params(project)
    params = monitor.params_for(project).model_dump(mode="json")
    return respond(FlagParamsOut(project=project, overrides=overrides, params=params))


@router.put("/projects/{project}/flag-params", response_model=FlagParamsOut)
def put_flag_params(
    project: ProjectName, body: dict[str, Any], request: Request, alerts: AlertStoreDep, principal: WriteAccess
) -> NaNJSONResponse:
    """Replace the project's overrides (a partial, nested dict of `FlagParams`; `{}` restores the defaults)."""
    principal.check_project(project)
    monitor: IngestMonitor = request.app.state.flag_monitor
    try:
        params = monitor.defaults.merged(body)
    except ValidationError as exc:
        detail = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise HTTPException(422, detail) from exc
    alerts.set_flag_params(project, body)
    return respond(FlagParamsOut(project=project, overrides=body, params=params.model_dump(mode="json")))
