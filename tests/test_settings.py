"""Settings from a plain mapping: defaults, every variable, and bad values that stop the worker."""

from __future__ import annotations

import pytest

from src.settings import Settings, SettingsError

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
        ({"MAX_CONCURRENCY": "0"}, "MAX_CONCURRENCY"),
        ({"MAX_CONCURRENCY": "9"}, "MAX_CONCURRENCY"),
        ({"MAX_CONCURRENCY": "2.5"}, "MAX_CONCURRENCY"),
        ({"MAX_CONCURRENCY": "-1"}, "MAX_CONCURRENCY"),
        ({"MAX_CONCURRENCY": "two"}, "MAX_CONCURRENCY"),
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
