"""Click commands of the model side (imported lazily by cli.py)."""
