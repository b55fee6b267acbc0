"""Data: parquet image-text datasets (schema), the offline grouping benchmark, the Ray Data pipeline."""
