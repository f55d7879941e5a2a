"""Pydantic models of the alert API (`/api/v1/alert-rules`, `/api/v1/alerts`), the flag kinds and a run's
entropy forecast (`/api/v1/flag-kinds`, `/api/v1/runs/{run_id}/forecast`).

A rule watches one condition in a project (every run) or in one run:
- `threshold`: a scalar compared with a value for `for_steps` logged steps in a row;
- `spike`: a scalar's robust z-score against its rolling median/MAD;
- `flag`: a flag of a kind (or any kind) at or above a severity.
Scalar conditions fire when they become true (not at every step while they hold), and
each (rule, run) then stays quiet for `cooldown_s` seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AnyHttpUrl, BaseModel, Field, WithJsonSchema, model_validator

from mhpo_server.monitoring.detectors import KINDS
from mhpo_server.schemas import KEY_PATTERN, InputModel, Integral, Key, Name, Severity

Channel = Literal["dashboard", "webhook"]
DeliveryStatus = Literal["none", "pending", "delivered", "failed"]
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
# Rules are evaluated on every batch of every run of their project: this bounds that work per batch.
MAX_RULES_PER_PROJECT = 100


_In = InputModel


WEBHOOK_URL_HELP = (
    "http(s) URL of a public receiver: loopback, link-local, private and reserved addresses, internal names "
    "and user:pass@ URLs are refused with a 422 unless allowed by MHPO_WEBHOOK_ALLOW_HOSTS / MHPO_WEBHOOK_ALLOW_CIDRS"
)
RunId = Annotated[str, Field(min_length=1, max_length=36, pattern=KEY_PATTERN)]


class ThresholdCondition(_In):
    type: Literal["threshold"]
    key: Key
    op: Literal[">", ">=", "<", "<=", "==", "!="]
    value: Annotated[float, Field(allow_inf_nan=False)]
    for_steps: Annotated[int, Field(ge=1, le=10_000), Integral] = 1


class SpikeCondition(_In):
    type: Literal["spike"]
    key: Key
    direction: Literal["up", "down", "both"] = "up"
    z: Annotated[float, Field(gt=0, le=1e6)] = 6.0
    window_steps: Annotated[int, Field(ge=5, le=10_000), Integral] = 50
    min_baseline: Annotated[int, Field(ge=3, le=10_000), Integral] = 20


ANY_KIND = "*"
CONDITION_KINDS = (*KINDS, ANY_KIND)


def _known_kind(kind: str) -> str:
    if kind not in CONDITION_KINDS:
        raise ValueError(f"kind {kind!r} is not a flag kind: give one of {', '.join(KINDS)}, or '*' for any kind")
    return kind


# A flag kind of the detectors' registry (`KINDS`) or "*"; the OpenAPI schema lists them as an enum.
FlagKind = Annotated[
    str, AfterValidator(_known_kind), WithJsonSchema({"type": "string", "enum": list(CONDITION_KINDS)})
]


class FlagCondition(_In):
    type: Literal["flag"]
    kind: FlagKind = ANY_KIND
    min_severity: Severity = "warning"


Condition = Annotated[ThresholdCondition | SpikeCondition | FlagCondition, Field(discriminator="type")]


class AlertRuleCreate(_In):
    name: Name
    project: Name
    run_id: RunId | None = Field(None, description="limit the rule to one run of the project; null watches every run")
    condition: Condition
    severity: Severity = "warning"
    cooldown_s: Annotated[float, Field(ge=0, le=365 * 86400)] = 600.0
    channels: Annotated[list[Channel], Field(min_length=1)] = ["dashboard"]
    webhook_url: AnyHttpUrl | None = Field(None, description=WEBHOOK_URL_HELP)
    enabled: bool = True

    @model_validator(mode="after")
    def _webhook_needs_url(self) -> AlertRuleCreate:
        _check_webhook(self.channels, self.webhook_url)
        return self


class AlertRulePatch(_In):
    """The fields to change; null leaves a field unchanged, except `run_id` and `webhook_url`, where null clears it."""

    name: Name | None = None
    run_id: RunId | None = None
    condition: Condition | None = None
    severity: Severity | None = None
    cooldown_s: Annotated[float, Field(ge=0, le=365 * 86400)] | None = None
    channels: Annotated[list[Channel], Field(min_length=1)] | None = None
    webhook_url: AnyHttpUrl | None = Field(None, description=WEBHOOK_URL_HELP)
    enabled: bool | None = None


def _check_webhook(channels: Sequence[str], url: Any) -> None:
    if "webhook" in channels and url is None:
        raise ValueError("webhook_url: required when channels contains 'webhook' (an http:// or https:// URL)")


class AlertRule(BaseModel):
    id: int
    name: str
    project: str
    run_id: str | None
    condition: Condition
    severity: str
    cooldown_s: float
    channels: list[str]
    webhook_url: str | None
    enabled: bool
    created_at: float
    updated_at: float


class AlertRuleList(BaseModel):
    rules: list[AlertRule]


class Alert(BaseModel):
    """A fired alert; `type` is "alert" so it sits beside flags in a run's event list."""

    id: int
    type: Literal["alert"] = "alert"
    rule_id: int | None
    rule_name: str
    project: str
    run_id: str
    step: int
    severity: str
    message: str
    evidence: dict[str, Any] | None
    created_at: float
    acknowledged_at: float | None
    delivery_status: DeliveryStatus
    delivery_attempts: int
    delivery_error: str | None
    delivered_at: float | None
    rewound_at: float | None = Field(
        None, description="when a rewind of the run took this alert's step out of its history"
    )


class AlertList(BaseModel):
    alerts: list[Alert]


class FlagParamsOut(BaseModel):
    project: str
    overrides: dict[str, Any]
    params: dict[str, Any]


class FlagKinds(BaseModel):
    """The kinds a flag may have, in the detectors' order; a flag condition also takes "*" (any kind)."""

    kinds: list[str]


class EntropyForecastOut(BaseModel):
    """The entropy forecast at a run's latest rollout (`mhpo_server.monitoring.forecast.EntropyForecast`).

    Every forecast field is null, and `reason` says why, while the run has too few rollouts of
    `key` (the early reference plus the trend window) or logs no `key` at all.
    """

    run_id: str
    key: str = Field(description="the entropy scalar forecast, e.g. policy/entropy")
    unit: Literal["optimizer steps"] = Field(
        "optimizer steps", description="the unit of `step`, `steps_left`, `crossing_step` and `spacing`"
    )
    floor: float = Field(description="the level whose crossing is forecast, as a fraction of `reference`")
    step: int | None = Field(None, description="the latest rollout's step, where the forecast is made")
    reference: float | None = Field(None, description="the early reference: median of the run's first points")
    level: float | None = Field(None, description="the entropy now: median of the last few points")
    fraction: float | None = Field(None, description="`level` / `reference`")
    slope: float | None = Field(None, description="Theil-Sen slope of the trend window, entropy per optimizer step")
    z: float | None = Field(None, description="Mann-Kendall z of the trend window (negative: falling)")
    cov: float | None = Field(None, description="median `policy/cov_logp_adv` over the window, where logged")
    steps_left: int | None = Field(
        None, description="steps until the trend crosses `floor` x `reference`; 0 under it; null when not falling"
    )
    crossing_step: int | None = Field(None, description="`step` + `steps_left`")
    spacing: float | None = Field(None, description="optimizer steps per point of the series (per rollout)")
    accelerating: bool | None = Field(
        None,
        description="the trend is steeper, by the set factor, than the pace from the reference to the window's start",
    )
    confident: bool | None = Field(
        None, description="the decline accelerates, is systematic and meaningful, near, and the covariance agrees"
    )
    reason: str | None = Field(None, description="why there is no forecast (null when there is one)")
