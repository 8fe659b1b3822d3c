"""Parallelism: the process-group mesh, and (later) sharded and parallel twins of model parts."""
