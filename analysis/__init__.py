"""alcot.analysis: reads MLflow runs into pandas, fits scaling laws, draws plots."""
