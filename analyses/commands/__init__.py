"""Click commands of the torch-free analyses (loaded lazily by cli.py)."""
