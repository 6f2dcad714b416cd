"""What every other package stands on: the settings, the GPU stage (the one thread that runs
torch), the one error type, logging with redaction and stage timings."""
