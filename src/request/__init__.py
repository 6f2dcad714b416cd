"""The request: the typed schema of a job's `input` with every default and bound, and its price."""
