"""``GET /v1/detector``: what is loaded."""

from __future__ import annotations

from fastapi import APIRouter

from routescan.service.deps import Authorized, ServiceDep
from routescan.service.schemas import DetectorInfo

router = APIRouter(prefix="/v1", tags=["detector"], dependencies=[Authorized])


@router.get("/detector", response_model=DetectorInfo)
async def detector_info(service: ServiceDep) -> DetectorInfo:
    """Model, fingerprint spec, thresholds and training summary of the loaded detector."""
    card, point = service.scorer.card, service.scorer.point
    return DetectorInfo(
        detector_id=card.detector_id,
        version=card.version,
        demo=card.demo,
        model_id=card.spec.model_id,
        launch_model=card.spec.launch_model,
        fingerprint_spec=card.spec.model_dump(mode="json"),
        features=card.spec.dim,
        operating_points=[p.model_dump() for p in card.operating_points],
        active_operating_point=point.name,
        estimator=card.estimator,
        training_command=card.training_command,
        corpus=card.corpus,
        training=card.training,
        metrics=card.metrics,
        notes=card.notes,
        export=card.export.model_dump(mode="json", exclude_none=True),
        export_values=card.export.dim(card.spec),
    )
