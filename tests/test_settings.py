"""Settings from a plain mapping: defaults, every variable, and bad values that stop the worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.runtime.settings import Settings, SettingsError

BUCKET = {
    "BUCKET_ENDPOINT_URL": "https://example.r2.cloudflarestorage.com",
    "BUCKET_ACCESS_KEY_ID": "AKIDEXAMPLE",
    "BUCKET_SECRET_ACCESS_KEY": "secretexample",
}


def test_defaults():
    settings = Settings.from_env({})
    assert settings.model == "Tongyi-MAI/Z-Image-Turbo"
    assert settings.safety_checker_model == "Falconsai/nsfw_image_detection"
    assert settings.safety_threshold == 0.5
    assert settings.bucket_name == "zimage-outputs"
    assert settings.price_per_image_usd == 0.005
    assert not settings.storage_enabled and settings.safety_enabled
    assert not settings.report_progress
    assert settings.max_concurrency == 2
    assert settings.lora_dirs == ("/runpod-volume/loras", "/loras")
    assert settings.lora_cache_dir is None
    assert (settings.lora_cache_gb, settings.lora_max_mb, settings.lora_max_loaded) == (20.0, 1024, 6)
    assert settings.precision == "bf16"


def test_every_variable_is_read():
    settings = Settings.from_env(
        {
            "ZIMAGE_MODEL": "/models/z",
            "SAFETY_CHECKER_MODEL": "none",
            "SAFETY_THRESHOLD": "0.8",
            "BUCKET_NAME": "my-images",
            "PRICE_PER_IMAGE_USD": "0.01",
            "BUCKET_REGION": "eu-west-1",
            "BUCKET_ADDRESSING_STYLE": "virtual",
            "RUNPOD_WEBHOOK_POST_OUTPUT": "https://api.runpod.ai/v2/x/job-done",
            "MAX_CONCURRENCY": "1",
            "LORA_DIRS": "/data/loras: /more/loras",
            "LORA_CACHE_DIR": "/data/lora-cache",
            "LORA_CACHE_GB": "2.5",
            "LORA_MAX_MB": "300",
            "LORA_MAX_LOADED": "2",
            "ZIMAGE_PRECISION": "FP8",
            **BUCKET,
        }
    )
    assert settings.model == "/models/z" and not settings.safety_enabled
    assert settings.safety_threshold == 0.8 and settings.price_per_image_usd == 0.01
    assert settings.storage_enabled and settings.bucket_name == "my-images"
    assert settings.bucket_endpoint_url == BUCKET["BUCKET_ENDPOINT_URL"]
    assert (settings.bucket_region, settings.bucket_addressing_style) == ("eu-west-1", "virtual")
    assert settings.report_progress
    assert settings.max_concurrency == 1
    assert settings.lora_dirs == ("/data/loras", "/more/loras")
    assert str(settings.lora_cache_path) == "/data/lora-cache"
    assert (settings.lora_cache_gb, settings.lora_max_mb, settings.lora_max_loaded) == (2.5, 300, 2)
    assert settings.precision == "fp8"


@pytest.mark.parametrize(
    ("env", "precision", "warned"),
    [
        ({"ZIMAGE_ACCELERATION": "fp8"}, "fp8", True),
        ({"ZIMAGE_ACCELERATION": "none"}, "bf16", True),
        ({"ZIMAGE_PRECISION": "bf16", "ZIMAGE_ACCELERATION": "fp8"}, "bf16", False),  # the new name wins
        ({"ZIMAGE_PRECISION": "fp8"}, "fp8", False),
    ],
)
def test_the_old_precision_name_still_works_with_a_warning(env, precision, warned, caplog):
    caplog.set_level("WARNING", logger="src.runtime.settings")
    assert Settings.from_env(env).precision == precision
    warnings = [r.getMessage() for r in caplog.records if "ZIMAGE_ACCELERATION" in r.getMessage()]
    assert bool(warnings) == warned
    if warned:
        assert f"ZIMAGE_PRECISION={precision}" in warnings[0]


def test_the_lora_cache_is_on_the_volume_only_when_one_is_mounted(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    volume = Path("/runpod-volume")
    expected = volume / "lora-cache" if volume.is_dir() else tmp_path / ".cache/zimage-loras"
    assert Settings.from_env({}).lora_cache_path == expected


def test_blank_values_mean_default():
    assert Settings.from_env({"ZIMAGE_MODEL": "  ", "SAFETY_THRESHOLD": ""}) == Settings.from_env({})


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SAFETY_THRESHOLD": "high"}, "SAFETY_THRESHOLD"),
        ({"SAFETY_THRESHOLD": "1.5"}, "SAFETY_THRESHOLD"),
        ({"SAFETY_THRESHOLD": "nan"}, "SAFETY_THRESHOLD"),
        ({"PRICE_PER_IMAGE_USD": "-1"}, "PRICE_PER_IMAGE_USD"),
        ({"PRICE_PER_IMAGE_USD": "five"}, "PRICE_PER_IMAGE_USD"),
        ({"BUCKET_NAME": "Bad_Name!"}, "BUCKET_NAME"),
        ({"BUCKET_ADDRESSING_STYLE": "dns"}, "BUCKET_ADDRESSING_STYLE"),
        ({"ZIMAGE_ACCELERATION": "int4"}, "ZIMAGE_ACCELERATION"),
        ({"ZIMAGE_PRECISION": "int4"}, "ZIMAGE_PRECISION"),
        ({"ZIMAGE_PRECISION": "none"}, "ZIMAGE_PRECISION"),
        ({"MAX_CONCURRENCY": "0"}, "MAX_CONCURRENCY"),
        ({"MAX_CONCURRENCY": "9"}, "MAX_CONCURRENCY"),
        ({"MAX_CONCURRENCY": "2.5"}, "MAX_CONCURRENCY"),
        ({"MAX_CONCURRENCY": "-1"}, "MAX_CONCURRENCY"),
        ({"MAX_CONCURRENCY": "two"}, "MAX_CONCURRENCY"),
        ({"LORA_DIRS": "loras:/loras"}, "LORA_DIRS"),
        ({"LORA_CACHE_DIR": "cache"}, "LORA_CACHE_DIR"),
        ({"LORA_CACHE_GB": "-1"}, "LORA_CACHE_GB"),
        ({"LORA_CACHE_GB": "lots"}, "LORA_CACHE_GB"),
        ({"LORA_MAX_MB": "0"}, "LORA_MAX_MB"),
        ({"LORA_MAX_MB": "1.5"}, "LORA_MAX_MB"),
        ({"LORA_MAX_LOADED": "0"}, "LORA_MAX_LOADED"),
        ({"LORA_MAX_LOADED": "65"}, "LORA_MAX_LOADED"),
        ({**BUCKET, "BUCKET_ENDPOINT_URL": "not a url"}, "BUCKET_ENDPOINT_URL"),
        ({**BUCKET, "BUCKET_ENDPOINT_URL": "ftp://host"}, "BUCKET_ENDPOINT_URL"),
        ({**BUCKET, "BUCKET_ENDPOINT_URL": "https://user:pw@host"}, "BUCKET_ENDPOINT_URL"),
        (
            {"BUCKET_ENDPOINT_URL": BUCKET["BUCKET_ENDPOINT_URL"]},
            "BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY",
        ),
        ({k: v for k, v in BUCKET.items() if k != "BUCKET_SECRET_ACCESS_KEY"}, "BUCKET_SECRET_ACCESS_KEY"),
    ],
)
def test_bad_values_name_the_variable(env, named):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert str(caught.value).startswith(named)


def test_a_bad_bucket_setting_never_echoes_the_secret():
    env = {k: v for k, v in BUCKET.items() if k != "BUCKET_ACCESS_KEY_ID"}
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert "secretexample" not in str(caught.value)


def test_control_settings():
    settings = Settings.from_env({})
    assert settings.controlnet_model == "none"
    assert settings.depth_model == "depth-anything/Depth-Anything-V2-Small-hf"
    assert not settings.control_enabled and not settings.depth_enabled  # depth only beside a ControlNet
    settings = Settings.from_env({"CONTROLNET_MODEL": "/models/cn", "DEPTH_MODEL": " /models/depth "})
    assert (settings.controlnet_model, settings.depth_model) == ("/models/cn", "/models/depth")
    assert settings.control_enabled and settings.depth_enabled
    settings = Settings.from_env({"CONTROLNET_MODEL": "/models/cn", "DEPTH_MODEL": "None"})
    assert settings.control_enabled and not settings.depth_enabled
    assert not Settings.from_env({"CONTROLNET_MODEL": "NONE"}).control_enabled


def test_endpoint_settings():
    settings = Settings.from_env({})
    assert (settings.endpoint_type, settings.port, settings.port_health, settings.worker_api_key) == (
        "queue",
        80,
        80,
        None,
    )
    settings = Settings.from_env({"ENDPOINT_TYPE": "LB", "PORT": "8000", "WORKER_API_KEY": " sk-1 "})
    assert (settings.endpoint_type, settings.port, settings.port_health) == (
        "lb",
        8000,
        8000,
    )  # /ping on PORT
    assert settings.worker_api_key == "sk-1"
    assert Settings.from_env({"PORT": "8000", "PORT_HEALTH": "8001"}).port_health == 8001
    for env, named in [
        ({"ENDPOINT_TYPE": "LoadBalancer"}, "ENDPOINT_TYPE"),
        ({"PORT": "0"}, "PORT"),
        ({"PORT": "65536"}, "PORT"),
        ({"PORT": "http"}, "PORT"),
        ({"PORT_HEALTH": "-1"}, "PORT_HEALTH"),
    ]:
        with pytest.raises(SettingsError) as caught:
            Settings.from_env(env)
        assert str(caught.value).startswith(f"{named}: "), caught.value
