"""Structural control: the ControlNet's loading and release configs, and the control map's
preprocessing (canny, depth)."""
