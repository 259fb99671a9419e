"""The X-ray service: ``POST /v1/classify`` (PNG / JPEG / NPY) -> calibrated probabilities; ``?saliency=png``.

Built by :func:`core.serving.create_service` (lifespan loading from the registry, micro-batching, health,
metrics, request ids, body limits, admin reload/promote, hot reload when the alias moves). Run it alone with
``keel serve medical`` or behind the gateway with ``keel serve all`` (page at ``/medical/ui``).

The image goes in as a multipart form field ``file`` or as the raw request body. Any size is accepted:
it is converted to greyscale and resized to PneumoniaMNIST's 28x28 (the model then upsamples it, as in
training). An image that cannot be read is a 422 with the reason.
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import Response
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from apps.medical.data import IMAGE_SIZE
from apps.medical.model import load_predictor
from apps.medical.saliency import overlay_png
from core.serving import ModelDep, ModelHandle, ServingSettings, create_service

__all__ = ["ClassifyResponse", "ImageDecodeError", "MedicalSettings", "create_app", "decode_image", "get_settings"]

MAX_PIXELS = 4096 * 4096  # refuse decompression bombs before decoding them
_NPY_MAGIC = b"\x93NUMPY"


class MedicalSettings(BaseSettings):
    """Medical-service settings (``KEEL_MEDICAL_*``)."""

    model_config = SettingsConfigDict(env_prefix="KEEL_MEDICAL_", extra="ignore", frozen=True)

    model_ref: str = Field(default="medical@production", description="Registry reference of the model served.")


@lru_cache
def get_settings() -> MedicalSettings:
    return MedicalSettings()


class ImageDecodeError(ValueError):
    """The uploaded bytes are not a usable greyscale or colour image."""


class Probabilities(BaseModel):
    normal: float = Field(ge=0, le=1)
    pneumonia: float = Field(ge=0, le=1)


class ClassifyResponse(BaseModel):
    probabilities: Probabilities = Field(description="Calibrated (temperature scaling) for the training prevalence.")
    decision: Literal["normal", "pneumonia"]
    threshold: float = Field(description="P(pneumonia) above which the decision is pneumonia.")
    model: str = Field(description="Registry version that classified it, e.g. medical@3.")


def _from_npy(data: bytes) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ImageDecodeError(f"unreadable .npy: {err}") from None
    if not np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_:
        raise ImageDecodeError(f".npy must hold numbers, got dtype {arr.dtype}")
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(-1)
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ImageDecodeError(f".npy must be an (H, W) greyscale image, got shape {arr.shape}")
    if arr.size > MAX_PIXELS:
        raise ImageDecodeError(f"image has {arr.size} pixels; at most {MAX_PIXELS}")
    if arr.dtype == np.uint8:
        return arr
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise ImageDecodeError(".npy holds NaN or infinite values")
    if values.min() < 0 or values.max() > 255:
        raise ImageDecodeError(f".npy values must lie in [0, 1] or [0, 255], got [{values.min():g}, {values.max():g}]")
    scale = 255.0 if values.max() <= 1.0 else 1.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def _from_picture(data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("PNG", "JPEG"):
                raise ImageDecodeError(f"unsupported image format {img.format}; send PNG, JPEG or NPY")
            if img.width * img.height > MAX_PIXELS:
                raise ImageDecodeError(f"image is {img.width}x{img.height}; at most {MAX_PIXELS} pixels")
            img.load()
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise ImageDecodeError("not a PNG, JPEG or NPY image") from None
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageDecodeError):
            raise
        raise ImageDecodeError(f"corrupt or truncated image: {err}") from None


def decode_image(data: bytes) -> np.ndarray:
    """PNG / JPEG / NPY bytes -> a (28, 28) uint8 greyscale image (resized with area averaging when larger).

    Raises:
        ImageDecodeError: empty, unknown format, corrupt, wrong shape, non-finite or out-of-range values.
    """
    from PIL import Image

    if not data:
        raise ImageDecodeError("empty upload: send a PNG, JPEG or NPY image")
    arr = _from_npy(data) if data.startswith(_NPY_MAGIC) else _from_picture(data)
    if arr.shape != (IMAGE_SIZE, IMAGE_SIZE):
        resample = Image.Resampling.BOX if min(arr.shape) >= IMAGE_SIZE else Image.Resampling.BICUBIC
        arr = np.asarray(Image.fromarray(arr).resize((IMAGE_SIZE, IMAGE_SIZE), resample), np.uint8)
    return np.array(arr, np.uint8)  # a writable copy (PIL's arrays are read-only)


async def _read_upload(request: Request) -> bytes:
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form() as form:  # closes the spooled upload files
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT, "multipart upload needs a file field named 'file'"
                )
            return await upload.read()
    return await request.body()


router = APIRouter(prefix="/v1", tags=["medical"])

_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
        "required": True,
    }
}


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    openapi_extra=_UPLOAD_DOC,
    responses={200: {"content": {"image/png": {}}, "description": "JSON, or the Grad-CAM overlay with ?saliency=png"}},
)
async def classify(
    request: Request,
    model: ModelDep,
    saliency: Annotated[Literal["png"] | None, Query(description="'png': answer with the Grad-CAM overlay")] = None,
) -> Any:
    """Classify one chest X-ray; concurrent requests are micro-batched into one model call."""
    data = await _read_upload(request)
    try:
        image = decode_image(data)
    except ImageDecodeError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"cannot read the image: {err}") from None
    version = model.model_version
    ref = version.ref if version else model.ref
    if saliency == "png" and version is not None and version.config.get("kind") == "medical-edge":
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"saliency: {ref} is an edge export ({version.config.get('format')}) without gradients; Grad-CAM needs "
            "the PyTorch model it came from",
        )
    result = await model.predict({"image": image, "saliency": saliency == "png"})
    if saliency == "png":
        headers = {
            "X-Keel-Pneumonia-Probability": f"{result['probabilities']['pneumonia']:.6f}",
            "X-Keel-Decision": result["decision"],
            "X-Keel-Model": ref,
        }
        return Response(overlay_png(image, result["saliency"]), media_type="image/png", headers=headers)
    return ClassifyResponse(**result, model=ref)


def create_app(settings: ServingSettings | None = None, medical: MedicalSettings | None = None) -> FastAPI:
    """The medical FastAPI service; settings come from ``KEEL_*`` / ``KEEL_MEDICAL_*`` unless given."""
    settings = settings or ServingSettings()
    medical = medical or get_settings()
    handle = ModelHandle.from_settings(settings, ref=medical.model_ref, load=load_predictor)
    summary = "Chest X-ray pneumonia classifier: calibrated probabilities and Grad-CAM saliency."
    return create_service(name="medical", handle=handle, routers=[router], settings=settings, summary=summary)
