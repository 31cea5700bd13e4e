"""Request and response bodies of the HTTP API (they document themselves in the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Filters(BaseModel):
    """Metadata filters; a list means 'any of these values'."""

    model_config = ConfigDict(extra="forbid")
    modality: str | list[str] | None = Field(None, examples=["CT"])
    body_part: str | list[str] | None = Field(None, examples=["chest"])
    split: str | list[str] | None = Field(None, examples=["test"])
    abnormal: bool | None = None


class TextSearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(..., min_length=1, examples=["liver lesion with contrast enhancement"])
    k: int = Field(10, ge=1, description="number of studies to return (at most the server's max_k)")
    filters: Filters | None = None


class Thumbnails(BaseModel):
    axial: str
    coronal: str
    sagittal: str


class PredictedFinding(BaseModel):
    finding: str = Field(..., description='e.g. "metastasis in the liver"')
    label: str = Field(..., description='the model\'s label, "type|organ"')
    probability: float


class StudyHit(BaseModel):
    rank: int
    series_id: str
    score: float = Field(..., description="cosine similarity in the shared image-text space")
    report_excerpt: str | None = None
    metadata: dict[str, Any]
    thumbnails: Thumbnails | None = Field(..., description="null when this server holds no pixels for the id")
    url: str | None = Field(..., description="the study's API resource; null when this server does not know the study")
    predicted_findings: list[PredictedFinding] | None = Field(
        None, description="what the model sees in this scan (each label called at its calibrated threshold); "
                          "null when the model has no finding head")


class SearchResponse(BaseModel):
    results: list[StudyHit]
    index_version: str
    took_ms: float
    query: dict[str, Any]


class StudyResponse(BaseModel):
    series_id: str
    metadata: dict[str, Any]
    report: str | None
    slices: dict[str, int] = Field(..., description="number of slices per plane")
    thumbnails: Thumbnails
    predicted_findings: list[PredictedFinding] | None = None


class ReportResponse(BaseModel):
    method: Literal["retrieval", "generate"]
    report: str
    sources: list[dict[str, Any]] = Field(default_factory=list,
                                          description="studies a retrieval-based draft was composed from")
    detected: list[PredictedFinding] | None = Field(
        None, description="findings the model's finding head reads off the scan (retrieval drafts)")
    note: str


class EmbedResponse(BaseModel):
    series_id: str
    duplicate: bool = Field(..., description="true when the same voxels were already indexed")
    index_version: str
    index_size: int
    metadata: dict[str, Any]
    thumbnails: Thumbnails


class ErrorResponse(BaseModel):
    error: str
    detail: str
    error_id: str | None = Field(None, description="quote it when reporting the problem: the server's log has "
                                                   "the cause under this id (the response never does)")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    components: dict[str, Any]
