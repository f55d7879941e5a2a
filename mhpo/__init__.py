"""MHPO Monitor: MHPO and GRPO-family losses, trust-region diagnostics and a streaming client."""

__version__ = "0.1.0"
