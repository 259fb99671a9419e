"""``POST /v1/classify`` through the real service factory: PNG / JPEG / NPY, saliency PNG, 422s, the gateway page."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from apps.medical.app import APP
from apps.medical.data import synthetic_xrays
from apps.medical.service import create_app
from core.serving import ServingSettings, build_gateway


@pytest.fixture
def client(trained_registry: Path) -> Iterator[TestClient]:
    settings = ServingSettings(registry_root=trained_registry, reload_interval_s=0)
    with TestClient(create_app(settings)) as c:
        yield c


def _xray(label: int) -> np.ndarray:
    data = synthetic_xrays(40, seed=7)
    return data.images[int(np.flatnonzero(data.labels == label)[0])]


def _encode(image: np.ndarray, fmt: str, *, size: int = 28) -> bytes:
    buf = io.BytesIO()
    if fmt == "NPY":
        np.save(buf, image)
    else:
        Image.fromarray(image).resize((size, size)).convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(("fmt", "size"), [("PNG", 28), ("JPEG", 224), ("NPY", 28)])
def test_classify_returns_calibrated_probabilities(client: TestClient, fmt: str, size: int) -> None:
    files = {"file": (f"x.{fmt.lower()}", _encode(_xray(1), fmt, size=size), "application/octet-stream")}
    r = client.post("/v1/classify", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    probs = body["probabilities"]
    assert probs["normal"] + probs["pneumonia"] == pytest.approx(1.0)
    assert body["decision"] == ("pneumonia" if probs["pneumonia"] > body["threshold"] else "normal")
    assert body["model"] == "medical@1"


def test_the_model_tells_the_classes_apart_and_raw_bodies_work(client: TestClient) -> None:
    sick = client.post("/v1/classify", content=_encode(_xray(1), "PNG"), headers={"Content-Type": "image/png"})
    healthy = client.post("/v1/classify", content=_encode(_xray(0), "PNG"), headers={"Content-Type": "image/png"})
    assert sick.json()["probabilities"]["pneumonia"] > healthy.json()["probabilities"]["pneumonia"]


def test_float_npy_in_unit_range_is_accepted(client: TestClient) -> None:
    buf = io.BytesIO()
    np.save(buf, _xray(0).astype(np.float32) / 255)
    assert client.post("/v1/classify", content=buf.getvalue()).status_code == 200


def test_saliency_png_is_the_grad_cam_overlay(client: TestClient) -> None:
    r = client.post("/v1/classify?saliency=png", files={"file": ("x.png", _encode(_xray(1), "PNG"), "image/png")})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-keel-decision"] in ("normal", "pneumonia") and r.headers["x-keel-model"] == "medical@1"
    with Image.open(io.BytesIO(r.content)) as img:
        assert img.format == "PNG" and img.size == (256, 256)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty upload"),
        (b"GIF89a not really", "not a PNG, JPEG or NPY"),
        (_encode(_xray(0), "PNG")[:60], "corrupt or truncated"),
        (_npy(np.zeros((2, 3, 28, 28))), "shape"),
        (_npy(np.full((28, 28), np.nan)), "NaN"),
        (_npy(np.full((28, 28), -3.0)), "[0, 1] or [0, 255]"),
        (_npy(np.array(["a", "b"])), "dtype"),
    ],
)
def test_unreadable_images_are_a_422_with_the_reason(client: TestClient, payload: bytes, reason: str) -> None:
    r = client.post("/v1/classify", content=payload, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 422, r.text
    assert reason in r.json()["detail"]


def test_multipart_without_a_file_field_is_a_422(client: TestClient) -> None:
    r = client.post("/v1/classify", files={"image": ("x.png", _encode(_xray(0), "PNG"), "image/png")})
    assert r.status_code == 422 and "'file'" in r.json()["detail"]


def test_gateway_serves_the_page_and_classifies_under_the_prefix(trained_registry: Path) -> None:
    settings = ServingSettings(registry_root=trained_registry, reload_interval_s=0)
    gateway = build_gateway({"medical": create_app(settings)}, pages={"medical": APP.page or ""})
    with TestClient(gateway) as c:
        assert "saliency" in c.get("/medical/ui").text
        r = c.post("/medical/v1/classify", files={"file": ("x.png", _encode(_xray(1), "PNG"), "image/png")})
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def edge_ref(trained_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An ONNX Runtime export of the tiny model, registered as ``medical-edge`` (parent medical@1)."""
    from apps.medical.edge import EdgeConfig, build_variants, register_variant
    from apps.medical.model import load_predictor
    from apps.medical.train import MedicalTrainConfig
    from core.registry import ModelRegistry

    registry = ModelRegistry(trained_registry)
    version, state = registry.load("medical@1")
    recipe = MedicalTrainConfig(**{**version.config["recipe"], "registry_root": None})
    folder = tmp_path_factory.mktemp("edge")
    (onnx,) = build_variants(load_predictor(version, state), recipe, EdgeConfig(variants=("onnx",)), folder, source="t")
    return register_variant(registry, onnx, parent=version, cfg=EdgeConfig(), metrics={}).ref


def test_an_edge_export_serves_without_saliency(trained_registry: Path, edge_ref: str) -> None:
    from apps.medical.service import MedicalSettings

    settings = ServingSettings(registry_root=trained_registry, reload_interval_s=0)
    with (
        TestClient(create_app(settings, MedicalSettings(model_ref=edge_ref))) as c,
        TestClient(create_app(settings)) as torch_client,
    ):
        png = {"file": ("x.png", _encode(_xray(1), "PNG"), "image/png")}
        r = c.post("/v1/classify", files=png)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == edge_ref
        reference = torch_client.post("/v1/classify", files=png).json()  # the PyTorch model it was exported from
        assert r.json()["decision"] == reference["decision"]
        r = c.post("/v1/classify?saliency=png", files=png)
        assert r.status_code == 422 and "edge export" in r.json()["detail"] and "Grad-CAM" in r.json()["detail"]
