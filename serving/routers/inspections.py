"""Recorded inspections and their archived images (operators)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel

from cellinspect.models.card import Verdict
from cellinspect.serving.records import InspectionQuery, InspectionRecord
from cellinspect.serving.schemas import ID_PATTERN
from cellinspect.serving.service import OperatorRole, ServiceDep

router = APIRouter(prefix="/v1/inspections", tags=["inspections"])
InspectionId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="inspection id")]
Filter = Annotated[str | None, Query(max_length=128, pattern=ID_PATTERN)]
MEDIA = {"png": "image/png", "jpg": "image/jpeg", "bmp": "image/bmp", "tif": "image/tiff"}


class InspectionPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[InspectionRecord]


@router.get("", response_model=InspectionPage, summary="List inspections, newest first")
async def list_inspections(
    service: ServiceDep,
    _: OperatorRole,
    line_id: Filter = None,
    station_id: Filter = None,
    cell_id: Filter = None,
    verdict: Verdict | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> InspectionPage:
    query = InspectionQuery(
        line_id=line_id,
        station_id=station_id,
        cell_id=cell_id,
        verdict=verdict,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
    )
    items, total = await asyncio.to_thread(service.records.query, query)
    return InspectionPage(total=total, limit=limit, offset=offset, items=items)


async def _get(service: ServiceDep, inspection_id: str) -> InspectionRecord:
    record = await asyncio.to_thread(service.records.get, inspection_id)
    if record is None:
        raise HTTPException(404, f"no inspection {inspection_id}")
    return record


@router.get("/{inspection_id}", response_model=InspectionRecord, summary="One inspection")
async def get_inspection(
    service: ServiceDep, _: OperatorRole, inspection_id: InspectionId
) -> InspectionRecord:
    return await _get(service, inspection_id)


@router.get("/{inspection_id}/image", summary="The archived image of an inspection")
async def get_inspection_image(
    service: ServiceDep, _: OperatorRole, inspection_id: InspectionId
) -> FileResponse:
    record = await _get(service, inspection_id)
    if not record.archive_path:
        raise HTTPException(
            404, f"inspection {inspection_id} has no archived image (pass images are sampled)"
        )
    path = service.archive.resolve(record.archive_path)
    if not path.is_file():
        raise HTTPException(404, f"archived image of {inspection_id} is gone (retention or quota)")
    return FileResponse(
        path,
        media_type=MEDIA.get(path.suffix.lstrip("."), "application/octet-stream"),
        # The bytes are whatever a station uploaded: a browser must not sniff them into HTML.
        headers={"X-Content-Type-Options": "nosniff"},
    )
