"""What the reports read of a time window: its classification rows, the models that made them, and the reviews
of them with the agreement between model and reviewers. Functions take a Session; nothing here writes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from histod import LABELS
from histod.db.models import KIND_CLASSIFICATION, KIND_REVIEW, STATUS_CLASSIFIED, ModelRecord, Result


@dataclass(frozen=True)
class WindowRow:
    """What the reports need of one classification row."""

    status: str
    label: str | None
    p_malignant: float | None
    latency_ms: float
    duplicate_of: int | None
    error_reason: str | None
    model_sha256: str | None
    received_at: datetime
    classified_at: datetime
    threshold: float | None


def window_rows(session: Session, since: datetime, until: datetime) -> list[WindowRow]:
    """The classification rows received in [since, until), oldest first."""
    rows = session.execute(
        select(
            Result.status,
            Result.label,
            Result.p_malignant,
            Result.latency_ms,
            Result.duplicate_of,
            Result.error_reason,
            Result.model_sha256,
            Result.received_at,
            Result.classified_at,
            Result.threshold,
        )
        .where(Result.received_at >= since, Result.received_at < until, Result.kind == KIND_CLASSIFICATION)
        .order_by(Result.id)
    ).all()
    return [WindowRow(**row._asdict()) for row in rows]


def models_by_sha(session: Session, digests: Iterable[str]) -> dict[str, ModelRecord]:
    wanted = sorted(set(digests))
    return {m.sha256: m for m in session.scalars(select(ModelRecord).where(ModelRecord.sha256.in_(wanted)))}


# --- reviews ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reviewed:
    """A classification and the latest review of it."""

    result_id: int
    name: str
    received_at: datetime
    model_label: str
    p_malignant: float | None
    threshold: float | None
    review_id: int
    reviewer_label: str
    reviewer: str | None
    note: str | None
    reviewed_at: datetime

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["received_at"] = self.received_at.isoformat()
        data["reviewed_at"] = self.reviewed_at.isoformat()
        return data


def reviewed(session: Session, since: datetime, until: datetime) -> list[Reviewed]:
    """The classifications received in [since, until) that a person has reviewed (by now), each with its latest
    review, oldest result first."""
    review = aliased(Result)
    rows = session.execute(
        select(Result, review)
        .join(review, review.amends_id == Result.id)
        .where(
            Result.received_at >= since,
            Result.received_at < until,
            Result.kind == KIND_CLASSIFICATION,
            Result.status == STATUS_CLASSIFIED,
            review.kind == KIND_REVIEW,
        )
        .order_by(Result.id, review.id)
    ).all()
    latest: dict[int, Reviewed] = {}
    for result, rev in rows:  # a later review of the same result replaces an earlier one
        latest[result.id] = Reviewed(
            result_id=result.id,
            name=result.name,
            received_at=result.received_at,
            model_label=result.label or "",
            p_malignant=result.p_malignant,
            threshold=result.threshold,
            review_id=rev.id,
            reviewer_label=rev.label or "",
            reviewer=rev.reviewer,
            note=rev.note,
            reviewed_at=rev.received_at,
        )
    return list(latest.values())


@dataclass
class Agreement:
    """How often the model and the reviewers agree. ``matrix[i][j]``: the reviewer said LABELS[i], the model
    LABELS[j]. Cohen's kappa is the agreement beyond what the two sides' label frequencies give by chance;
    None when chance alone explains everything (both sides always gave the same one label)."""

    reviewed: int = 0
    matrix: list[list[int]] = field(default_factory=lambda: [[0, 0], [0, 0]])
    agreement: float | None = None
    kappa: float | None = None
    disagreements: list[Reviewed] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "reviewed": self.reviewed,
            "labels": list(LABELS),
            "matrix": self.matrix,
            "agreement": self.agreement,
            "kappa": self.kappa,
            "disagreements": [d.to_json() for d in self.disagreements],
        }


def cohen_kappa(reviewer_labels: Sequence[str], model_labels: Sequence[str]) -> float | None:
    """Cohen's kappa of the two sides' labels: (p_o - p_e) / (1 - p_e), with p_e from each side's label
    frequencies; None when it is undefined (no item, or chance alone explains everything: both sides always gave
    the same one label). Closed form, so that a serving install (no scikit-learn) reports it too."""
    n = len(reviewer_labels)
    if n == 0:
        return None
    observed = sum(r == m for r, m in zip(reviewer_labels, model_labels, strict=True)) / n
    chance = sum((reviewer_labels.count(label) / n) * (model_labels.count(label) / n) for label in LABELS)
    return None if chance >= 1.0 else (observed - chance) / (1.0 - chance)


def agreement(items: Sequence[Reviewed]) -> Agreement:
    """The agreement matrix, observed agreement, Cohen's kappa and the disagreements of ``items``."""
    out = Agreement(reviewed=len(items))
    index = {label: i for i, label in enumerate(LABELS)}
    for item in items:
        if item.reviewer_label in index and item.model_label in index:
            out.matrix[index[item.reviewer_label]][index[item.model_label]] += 1
        if item.reviewer_label != item.model_label:
            out.disagreements.append(item)
    if items:
        out.agreement = (len(items) - len(out.disagreements)) / len(items)
        counted = [i for i in items if i.reviewer_label in index and i.model_label in index]
        out.kappa = cohen_kappa([i.reviewer_label for i in counted], [i.model_label for i in counted])
    return out
