"""The PCB inspection service: ``POST /v1/inspect`` (multipart: test image, optional template) -> defect boxes.

``?render=png`` answers the test image with the boxes drawn instead of JSON. Unreadable images, a template of
another size than the test image, or images outside 32..4096 px get 422 naming the field. Built by
:func:`core.serving.create_service` (lifespan loading from the registry, micro-batching, health, metrics, hot
reload). Run it alone with ``keel serve pcb_inspection`` or in the gateway with ``keel serve all``.

The edge export (:mod:`apps.pcb_inspection.edge`: ONNX / int8 on :class:`core.lite.LiteModel`) is served by pointing
the model reference at it, ``KEEL_PCB_MODEL_REF=pcb_inspection-edge@production`` (``KEEL_PCB_LITE_THREADS`` sets
ONNX Runtime's threads); the response schema and the decoding are the same as for the PyTorch model.
"""

from __future__ import annotations

import io
from functools import lru_cache, partial
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import Response
from PIL import Image, ImageDraw, UnidentifiedImageError
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from apps.pcb_inspection.data import CLASSES
from apps.pcb_inspection.model import load_predictor
from core.serving import ModelDep, ServingSettings, create_service
from core.serving.model_handle import ModelHandle

__all__ = ["Defect", "InspectResponse", "PcbSettings", "create_app", "get_settings", "render_png"]

MIN_SIDE, MAX_SIDE = 32, 4096
#: One colour per class for ``?render=png``.
COLOURS = {"open": "#e53935", "short": "#1e88e5", "mousebite": "#fb8c00", "spur": "#8e24aa", "copper": "#43a047",
           "pin-hole": "#00acc1"}  # fmt: skip


class PcbSettings(BaseSettings):
    """PCB-service settings (``KEEL_PCB_*``)."""

    model_config = SettingsConfigDict(env_prefix="KEEL_PCB_", extra="ignore", frozen=True)

    model_ref: str = Field(
        default="pcb_inspection@production",
        description="Registry reference of the model: a PyTorch version or an edge export (pcb_inspection-edge@...).",
    )
    lite_threads: int | None = Field(
        default=None, ge=1, description="ONNX Runtime intra-op threads for an edge export (default: its own)."
    )


@lru_cache
def get_settings() -> PcbSettings:
    return PcbSettings()


class Defect(BaseModel):
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in test-image pixels.")
    class_name: Literal["open", "short", "mousebite", "spur", "copper", "pin-hole"] = Field(alias="class")
    score: float = Field(ge=0, le=1)

    model_config = {"populate_by_name": True}


class InspectResponse(BaseModel):
    defects: list[Defect]
    width: int
    height: int
    template_used: bool = Field(description="False when no template was sent (the model then sees the test alone).")
    model: str = Field(description="Registry version that answered, e.g. pcb_inspection@3.")


def _read_upload(field: str, data: bytes) -> np.ndarray:
    """Upload bytes -> (H, W) uint8 grey; 422 naming ``field`` when unreadable or of an unusable size."""
    if not data:
        raise HTTPException(422, f"{field}: empty file; send a PNG/JPEG/BMP/TIFF image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            grey = np.asarray(im.convert("L"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise HTTPException(422, f"{field}: not a readable image ({exc})") from None
    h, w = grey.shape
    if not (MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE):
        raise HTTPException(422, f"{field}: {w}x{h} px; each side must be {MIN_SIDE}..{MAX_SIDE} px")
    return grey


def render_png(grey: np.ndarray, defects: list[dict]) -> bytes:
    """The test image with each defect's box and label drawn, as PNG bytes."""
    canvas = Image.fromarray(grey).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for d in defects:
        colour = COLOURS.get(d["class"], "#ff0000")
        x1, y1, x2, y2 = d["box"]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=2)
        draw.text((x1 + 2, max(0, y1 - 11)), f"{d['class']} {d['score']:.2f}", fill=colour)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


router = APIRouter(prefix="/v1", tags=["pcb_inspection"])


@router.post(
    "/inspect",
    response_model=InspectResponse,
    responses={200: {"content": {"image/png": {}}, "description": "JSON, or a PNG with ?render=png."}},
)
async def inspect(
    model: ModelDep,
    test: Annotated[UploadFile, File(description="The test image (binarised or grey PCB scan).")],
    template: Annotated[UploadFile | None, File(description="Its defect-free template, same size.")] = None,
    render: Annotated[Literal["json", "png"], Query(description="'png': the image with the boxes drawn.")] = "json",
) -> InspectResponse | Response:
    """Finds defects (open, short, mousebite, spur, copper, pin-hole) on a test image, using its template if sent."""
    test_img = _read_upload("test", await test.read())
    tmpl_img = None
    if template is not None:
        tmpl_img = _read_upload("template", await template.read())
        if tmpl_img.shape != test_img.shape:
            th, tw = tmpl_img.shape
            h, w = test_img.shape
            raise HTTPException(422, f"template: {tw}x{th} px but test is {w}x{h} px; a pair must have one size")
    defects = await model.predict((test_img, tmpl_img))
    if render == "png":
        return Response(render_png(test_img, defects), media_type="image/png")
    version = model.model_version
    h, w = test_img.shape
    return InspectResponse(
        defects=[Defect.model_validate(d) for d in defects],
        width=w,
        height=h,
        template_used=tmpl_img is not None,
        model=version.ref if version else model.ref,
    )


def create_app(settings: ServingSettings | None = None, pcb: PcbSettings | None = None) -> FastAPI:
    """The PCB inspection FastAPI service; settings come from ``KEEL_*`` / ``KEEL_PCB_*`` unless given."""
    settings = settings or ServingSettings()
    pcb = pcb or get_settings()
    load = partial(load_predictor, threads=pcb.lite_threads)
    handle = ModelHandle.from_settings(settings, ref=pcb.model_ref, load=load)
    summary = f"PCB defect inspection on template/test pairs: boxes for {', '.join(CLASSES)}."
    return create_service(name="pcb_inspection", handle=handle, routers=[router], settings=settings, summary=summary)
