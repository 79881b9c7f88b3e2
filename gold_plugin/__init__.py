"""GOLD (General On-Policy Logit Distillation) for OpenRLHF."""

__version__ = "0.1.0"
