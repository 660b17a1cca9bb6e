"""The compress stages, one per module; none knows how it is run (Ray Data or the local executor)."""
