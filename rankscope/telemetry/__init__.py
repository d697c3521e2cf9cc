"""Rank telemetry while training: the monitor and its transformers Trainer callback."""
