"""Flags computed by the service on ingest: detectors, their parameters, the listener."""

from server.flags.detectors import DETECTORS, KINDS, Flag, History, detect
from server.flags.params import DEFAULT_PARAMS, FlagParams

__all__ = ["DEFAULT_PARAMS", "DETECTORS", "KINDS", "Flag", "FlagParams", "History", "detect"]
