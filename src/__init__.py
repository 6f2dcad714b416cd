"""Z-Image Turbo on the Runpod serverless SDK: one module per concern (see README)."""
