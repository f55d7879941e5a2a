"""What the detectors know, for clients: the flag kinds, and the entropy forecast at a run's latest rollout.

The forecast is computed on request from the stored points the ingest listener judges (the
run's first points and its recent window, `stored_history`) with the project's detector
parameters, so the run page's entropy budget and the `collapse` flags rest on the same data.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request

from mhpo_server.deps import ReadAccess, StoreDep
from mhpo_server.monitoring import KINDS, FlagParams, latest_forecast, rollout_series
from mhpo_server.monitoring.detectors import StepKinds
from mhpo_server.monitoring.listener import IngestMonitor, stored_history
from mhpo_server.monitoring.params import COV_KEY, STEP_KIND_KEYS
from mhpo_server.monitoring.schemas import EntropyForecastOut, FlagKinds
from mhpo_server.responses import NaNJSONResponse, respond
from mhpo_server.routes.runs import authorized_run
from mhpo_server.schemas import Run
from mhpo_server.store import Store

router = APIRouter(prefix="/api/v1", tags=["flags"])


@router.get("/flag-kinds", response_model=FlagKinds)
def flag_kinds(_principal: ReadAccess) -> NaNJSONResponse:
    """Every kind a flag may have (a flag alert rule's `kind` is one of them or "*")."""
    return respond(FlagKinds(kinds=list(KINDS)))


@router.get("/runs/{run_id}/forecast", response_model=EntropyForecastOut)
def get_forecast(run_id: uuid.UUID, request: Request, store: StoreDep, principal: ReadAccess) -> NaNJSONResponse:
    """The entropy forecast at the run's latest rollout: how many optimizer steps until the policy entropy
    would cross a quarter of its early reference (`steps_left`, null while it is not falling).

    With too few rollouts, or no `policy/entropy` logged, the forecast fields are null and `reason` says why.
    """
    run = authorized_run(store, principal, run_id)
    monitor: IngestMonitor = request.app.state.flag_monitor
    return respond(run_forecast(store, run, monitor.params_for(run.project)))


def run_forecast(store: Store, run: Run, params: FlagParams) -> EntropyForecastOut:
    """The forecast of `run` from its stored points, as the `collapse` detector makes it at the run's last step."""
    p = params.collapse
    out = EntropyForecastOut(run_id=run.run_id, key=p.key, floor=p.forecast.floor)
    if run.last_step is None:
        return out.model_copy(update={"reason": "the run has logged no step yet"})
    keys = {p.key, COV_KEY, *STEP_KIND_KEYS}
    history = stored_history(store, run.run_id, params, keys, run.last_step, run.last_step, params.history_steps())
    forecast = latest_forecast(history, p)
    if forecast is not None:
        return out.model_copy(update=forecast.as_dict())
    if history.series(p.key) is None:
        return out.model_copy(update={"reason": f"the run logs no {p.key}, which the forecast reads"})
    points = len(rollout_series(history, StepKinds(history), p.key)[0])
    needed = p.forecast.reference_points + p.forecast.trend_points
    if points < needed:
        reason = f"not enough rollouts yet: {points} of the {needed} points of {p.key} the forecast needs"
    else:
        reason = f"the early reference of {p.key} is not positive: there is no entropy to spend"
    return out.model_copy(update={"reason": reason})
