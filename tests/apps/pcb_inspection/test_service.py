"""``POST /v1/inspect`` through the real service factory: JSON boxes, ``?render=png``, 422s, and the gateway page."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from apps.pcb_inspection.app import APP
from apps.pcb_inspection.service import create_app
from core.serving import ServingSettings, build_gateway
from tests.apps.pcb_inspection.conftest import Trained


@pytest.fixture
def client(trained: Trained) -> Iterator[TestClient]:
    settings = ServingSettings(registry_root=trained.registry_root, reload_interval_s=0)
    with TestClient(create_app(settings)) as c:
        yield c


def _png(side: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random(side[::-1]) > 0.5).astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def test_inspect_returns_boxes_with_class_names(client: TestClient, trained: Trained) -> None:
    r = client.post("/v1/inspect", files={"test": ("t.png", _png()), "template": ("m.png", _png(seed=1))})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == trained.ref and body["width"] == body["height"] == 64 and body["template_used"]
    for d in body["defects"]:
        assert d["class"] in ("open", "short", "mousebite", "spur", "copper", "pin-hole")
        assert 0.3 <= d["score"] <= 1 and len(d["box"]) == 4


def test_template_is_optional(client: TestClient) -> None:
    r = client.post("/v1/inspect", files={"test": ("t.png", _png())})
    assert r.status_code == 200 and r.json()["template_used"] is False


def test_render_png_returns_the_image(client: TestClient) -> None:
    r = client.post("/v1/inspect?render=png", files={"test": ("t.png", _png((80, 64)))})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (80, 64)


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        ({"test": ("t.png", b"garbage")}, "test: not a readable image"),
        ({"test": ("t.png", b"")}, "test: empty file"),
        ({"test": ("t.png", _png()), "template": ("m.png", _png((96, 64)))}, "template: 96x64 px but test is 64x64"),
        ({"test": ("t.png", _png((16, 16)))}, "each side must be"),
        ({"test": ("t.png", _png()), "template": ("m.png", b"nope")}, "template: not a readable image"),
    ],
)
def test_bad_images_get_422_naming_the_field(client: TestClient, files: dict, needle: str) -> None:
    r = client.post("/v1/inspect", files=files)
    assert r.status_code == 422 and needle in r.text


def test_missing_test_image_is_422(client: TestClient) -> None:
    r = client.post("/v1/inspect", files={"template": ("m.png", _png())})
    assert r.status_code == 422 and "test" in r.text


def test_bad_render_value_is_422(client: TestClient) -> None:
    r = client.post("/v1/inspect?render=gif", files={"test": ("t.png", _png())})
    assert r.status_code == 422 and "render" in r.text


def test_gateway_serves_the_page_and_the_route(trained: Trained) -> None:
    settings = ServingSettings(registry_root=trained.registry_root, reload_interval_s=0)
    assert APP.page is not None and "v1/inspect" in APP.page
    gateway = build_gateway({"pcb_inspection": create_app(settings)}, pages={"pcb_inspection": APP.page})
    with TestClient(gateway) as c:
        assert "Inspect a printed-circuit board" in c.get("/pcb_inspection/ui").text
        r = c.post("/pcb_inspection/v1/inspect", files={"test": ("t.png", _png())})
        assert r.status_code == 200, r.text
