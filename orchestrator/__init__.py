"""alcot.orchestrator: sweep specs, trial identity, scheduling, tracking and the CLI."""
