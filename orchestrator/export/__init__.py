"""Export of trained runs: Hugging Face folders and MLflow models."""
