"""Input images: data URIs, bare base64 and URLs from a real HTTP server on loopback."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

import src.inputs.pictures as input_image
from src.inputs.pictures import cover_crop, load_image, load_inputs, load_mask
from src.request.parse import parse_request
from src.runtime.errors import JobError
from tests.conftest import Route, data_uri_of, png_bytes


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((128, 128), 50).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


JPEG = _jpeg()


def failure(value: str, width: int = 256, height: int = 256, field: str = "image") -> str:
    with pytest.raises(JobError) as caught:
        load_image(value, width, height, field)
    message = str(caught.value)
    assert message.startswith(f"{field}: ")
    return message


def test_data_uri_and_bare_base64_give_the_same_image():
    data = png_bytes((300, 200))
    from_uri = load_image(data_uri_of(data), 256, 256)
    bare = load_image(base64.b64encode(data).decode(), 256, 256)
    wrapped = load_image("\n".join(base64.encodebytes(data).decode().split()), 256, 256)
    assert from_uri.size == bare.size == wrapped.size == (256, 256)
    assert np.array_equal(np.asarray(from_uri), np.asarray(bare))
    assert np.array_equal(np.asarray(bare), np.asarray(wrapped))


def test_cover_and_centre_crop_keep_the_middle():
    # Left third red, middle green, right third blue: a square crop of a 3:1 image is green.
    array = np.zeros((100, 300, 3), dtype=np.uint8)
    array[:, :100, 0] = 255
    array[:, 100:200, 1] = 255
    array[:, 200:, 2] = 255
    out = cover_crop(Image.fromarray(array), 256, 256)
    assert out.size == (256, 256)
    assert tuple(np.asarray(out)[128, 128]) == (0, 255, 0)
    assert tuple(np.asarray(out)[128, 10])[1] > 200  # no red or blue band left at the edges


def test_exif_orientation_is_applied_first():
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 100, 100))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display is 90 degrees clockwise
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    out = load_image(data_uri_of(buffer.getvalue(), "image/jpeg"), 256, 512)
    # After rotation the image is portrait (100x200) with blue on top.
    assert out.size == (256, 512)
    top, bottom = np.asarray(out)[50, 128], np.asarray(out)[460, 128]
    assert top[2] > 200 and top[0] < 60
    assert bottom[0] > 200 and bottom[2] < 60


def test_transparency_is_flattened_onto_white():
    buffer = io.BytesIO()
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(buffer, format="PNG")
    out = load_image(data_uri_of(buffer.getvalue()), 256, 256)
    assert out.mode == "RGB" and tuple(np.asarray(out)[5, 5]) == (255, 255, 255)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("data:text/plain;base64,aGVsbG8=", "data URI must look like"),
        ("data:image/png,notbase64", "data URI must look like"),
        ("ftp://example.com/cat.png", "scheme 'ftp' is not allowed"),
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("gopher://x/", "scheme 'gopher' is not allowed"),
        ("!!!notbase64!!!", "not valid base64"),
        ("aGVsbG8", "not valid base64"),
        (base64.b64encode(b"hello world, not an image").decode(), "not an image"),
        (data_uri_of(png_bytes()[:60]), "broken or truncated"),
        (data_uri_of(JPEG[: len(JPEG) // 2], "image/jpeg"), "broken or truncated"),
    ],
)
def test_undecodable_values_say_why(value, says):
    assert says in failure(value)


@pytest.mark.parametrize("field", ["image", "mask", "control_image"])
def test_every_error_names_the_field_it_is_about(field):
    assert "not valid base64" in failure("!!!", field=field)
    assert "not an image" in failure(base64.b64encode(b"hello world").decode(), field=field)
    assert "scheme 'ftp'" in failure("ftp://example.com/x.png", field=field)


# ------------------------------------------------------------------------- masks
def png_of(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return data_uri_of(buffer.getvalue())


def test_mask_is_grayscale_and_fitted_like_the_image():
    # A 3:1 picture whose middle third differs: after cover and centre crop the mask's white
    # column lies exactly on the image's green column.
    image = np.zeros((100, 300, 3), dtype=np.uint8)
    image[:, 100:200, 1] = 255
    mask = np.zeros((100, 300, 3), dtype=np.uint8)  # an RGB mask: converted to grayscale
    mask[:, 100:200] = 255
    request = parse_request({"prompt": "a", "image": png_of(image), "mask": png_of(mask), "size": "512*256"})
    inputs = load_inputs(request)
    assert inputs.mask.mode == "L" and inputs.mask.size == inputs.image.size == (512, 256)
    kept = np.asarray(inputs.mask) == 255
    assert np.array_equal(kept, np.asarray(inputs.image)[:, :, 1] == 255)
    assert kept.any() and not kept.all()


def test_no_mask_and_no_image():
    assert load_inputs(parse_request({"prompt": "a"})).image is None
    inputs = load_inputs(parse_request({"prompt": "a", "image": data_uri_of(png_bytes())}))
    assert inputs.image.size == (1024, 1024) and inputs.mask is None


def test_mask_of_another_size_is_refused_with_both_sizes():
    with pytest.raises(JobError) as caught:
        load_mask(data_uri_of(png_bytes((640, 480))), (800, 600), 256, 256)
    assert str(caught.value).startswith("mask: 640x480 does not match the image's 800x600: ")


def test_mask_exif_orientation_is_applied_before_the_size_check():
    """A phone mask stored landscape with 'rotate 90' matches a portrait image."""
    stored = Image.new("L", (200, 100), 0)
    stored.paste(255, (0, 0, 100, 100))  # left half white: after rotation, the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    mask = np.asarray(load_mask(data_uri_of(buffer.getvalue(), "image/jpeg"), (100, 200), 256, 512))
    assert mask.shape == (512, 256) and mask[50, 128] > 200 and mask[460, 128] < 50


def test_mask_errors_name_the_mask():
    assert "not an image" in failure(base64.b64encode(b"not a picture").decode(), field="mask")
    with pytest.raises(JobError) as caught:
        load_inputs(parse_request({"prompt": "a", "image": data_uri_of(png_bytes()), "mask": "!!!"}))
    assert str(caught.value).startswith("mask: not valid base64")


def test_pixel_cap_and_bomb():
    buffer = io.BytesIO()
    Image.new("L", (7000, 6000)).save(buffer, format="PNG")  # 42 MP of zeros: a few KB
    assert "7000x6000 is over the 40 megapixel cap" in failure(data_uri_of(buffer.getvalue()))


def test_encoded_size_cap(monkeypatch):
    monkeypatch.setattr(input_image, "MAX_BYTES", 1024)
    assert "base64 data is over the 0 MiB cap" in failure("A" * 4096)


# ------------------------------------------------------------------------- URLs
def test_url_is_fetched(image_server, allow_loopback_downloads):
    image_server.routes["/cat.png"] = Route(png_bytes((320, 240)), headers={"Content-Type": "image/png"})
    out = load_image(f"{image_server.url}/cat.png", 256, 256)
    assert out.size == (256, 256) and tuple(np.asarray(out)[100, 100]) == (200, 30, 30)
    assert image_server.received[0][:2] == ("GET", "/cat.png")


def test_redirects_are_followed(image_server, allow_loopback_downloads):
    image_server.routes["/old"] = Route(status=302, headers={"Location": "/new.png"})
    image_server.routes["/new.png"] = Route(png_bytes())
    assert load_image(f"{image_server.url}/old", 256, 256).size == (256, 256)


def test_loopback_is_refused_without_the_sdk_switch(image_server, monkeypatch):
    monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", raising=False)
    image_server.routes["/cat.png"] = Route(png_bytes())
    message = failure(f"{image_server.url}/cat.png")
    assert "is refused" in message and "non-public address" in message
    assert image_server.received == []  # never connected


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x.png",
        "http://192.168.1.1/x.png",
        "http://[::1]/x.png",
        "http://localhost/x.png",
        "http://100.64.0.1/x.png",
    ],
)
def test_private_and_metadata_addresses_are_refused(url, monkeypatch):
    monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", raising=False)
    assert "is refused" in failure(url)


def test_http_errors_name_the_status(image_server, allow_loopback_downloads):
    image_server.routes["/gone"] = Route(b"nope", status=404)
    image_server.routes["/boom"] = Route(b"nope", status=500)
    assert "failed with HTTP 404" in failure(f"{image_server.url}/gone")
    assert "failed with HTTP 500" in failure(f"{image_server.url}/boom")


def test_declared_size_over_the_cap(image_server, allow_loopback_downloads):
    image_server.routes["/huge"] = Route(b"x" * 10, headers={"Content-Length": str(64 * 2**20)})
    assert "over the 32 MiB cap" in failure(f"{image_server.url}/huge")


def test_streamed_size_over_the_cap(image_server, allow_loopback_downloads, monkeypatch):
    monkeypatch.setattr(input_image, "MAX_BYTES", 100_000)
    image_server.routes["/big"] = Route(b"x" * 300_000, length=False)  # no size declared up front
    assert "over the 0 MiB cap" in failure(f"{image_server.url}/big")


def test_not_an_image_over_http(image_server, allow_loopback_downloads):
    image_server.routes["/page"] = Route(b"<html>hello</html>", headers={"Content-Type": "text/html"})
    assert "not an image" in failure(f"{image_server.url}/page")


def test_slow_host_hits_the_time_cap(image_server, allow_loopback_downloads, monkeypatch):
    monkeypatch.setattr(input_image, "DOWNLOAD_SECONDS", 1.0)
    image_server.routes["/slow"] = Route(b"x" * 40_000, delay=0.1)  # 40 chunks, 4 s in all
    assert "took over 1 s" in failure(f"{image_server.url}/slow")


def test_unreachable_host(allow_loopback_downloads):
    from tests.conftest import free_port

    assert "could not be fetched" in failure(f"http://127.0.0.1:{free_port()}/x.png")


def test_mask_url_faults_name_the_mask(image_server, allow_loopback_downloads):
    image_server.routes["/gone.png"] = Route(b"nope", status=404)
    assert "failed with HTTP 404" in failure(f"{image_server.url}/gone.png", field="mask")


def test_messages_never_carry_a_url_query(image_server, allow_loopback_downloads):
    image_server.routes["/signed.png?X-Amz-Signature=abc123secret"] = Route(b"nope", status=403)
    message = failure(f"{image_server.url}/signed.png?X-Amz-Signature=abc123secret")
    assert "HTTP 403" in message and "abc123secret" not in message
