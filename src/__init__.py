"""Z-Image on the Runpod serverless SDK: eight packages, each importing only those below it
(README, "Layout")."""
