"""Delivery: encoding the images (PNG, JPEG, WebP, data URIs) and storing them in S3-compatible
buckets with presigned links."""
