"""Z-Image on the Runpod serverless SDK: eight packages, each importing only those below it
(docs/architecture.md)."""
