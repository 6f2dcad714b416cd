"""LoRA adapters: the path rule and the fetched-file cache (`files`), activating adapters on the
GPU thread (`adapters`), and fixed slots for a compiled transformer (`hotswap`)."""
