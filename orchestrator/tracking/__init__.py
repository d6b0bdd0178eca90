"""Tracking: the run folder's journal and its delivery to MLflow, leases, MLflow metadata."""
