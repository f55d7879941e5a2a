"""Flags computed by the service on ingest: detectors, their parameters, the listener."""

from mhpo_server.monitoring.detectors import DETECTORS, KINDS, Flag, History, detect
from mhpo_server.monitoring.params import DEFAULT_PARAMS, FlagParams

__all__ = ["DEFAULT_PARAMS", "DETECTORS", "KINDS", "Flag", "FlagParams", "History", "detect"]
