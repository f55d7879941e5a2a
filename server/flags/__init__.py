"""Flags computed by the service on ingest (DESIGN 2.1): detectors, their parameters, the listener."""

from server.flags.detectors import DETECTORS, KINDS, Flag, History, detect
from server.flags.params import DEFAULT_PARAMS, FlagParams

__all__ = ["DEFAULT_PARAMS", "DETECTORS", "KINDS", "Flag", "FlagParams", "History", "detect"]
