"""Picture inputs: `image`, `mask` and `control_image` as data URIs, base64 or URLs, and the one
SSRF-safe capped download that picture and LoRA fetches share."""
