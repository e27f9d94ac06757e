"""Multi-objective search over pipelines (filled by the search issue)."""
