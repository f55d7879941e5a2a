"""Alert rules on scalars and flags, fired alerts, and webhook delivery."""
