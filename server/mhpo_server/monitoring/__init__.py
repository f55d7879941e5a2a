"""Monitoring on ingest: flags (detectors in a registry, their parameters, robust statistics),
alert rules, the ingest listener that runs both, and webhook delivery."""

from mhpo_server.monitoring.detectors import DETECTORS, KINDS, Flag, History, detect, register_detector
from mhpo_server.monitoring.params import DEFAULT_PARAMS, FlagParams
from mhpo_server.monitoring.states import latest_forecast, rollout_series

__all__ = [
    "DEFAULT_PARAMS",
    "DETECTORS",
    "KINDS",
    "Flag",
    "FlagParams",
    "History",
    "detect",
    "latest_forecast",
    "register_detector",
    "rollout_series",
]
