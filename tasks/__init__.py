"""The six pipeline stages, one module each (same names as in dvc.yaml)."""
