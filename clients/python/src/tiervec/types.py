"""The answers of tiervec's APIs as typed values."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


class TiervecError(Exception):
    """An error answer: the HTTP status, the API's code (``collection_not_found``,
    ``invalid_text``, ``no_model``, …; docs/cloud.md) and its message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def payload_of(raw: Any) -> Optional[Dict[str, Any]]:
    """A payload as a JSON object: both tiers answer with the JSON value the point holds. A
    string is read as the JSON text it may hold (an edge older than protocol 6 sent payloads
    as strings), else as ``{"text": …}``; any other value as ``{"value": …}``."""
    if raw is None or isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except ValueError:
            return {"text": raw}
        return value if isinstance(value, dict) else {"text": raw}
    return {"value": raw}


@dataclass(frozen=True)
class Hit:
    id: int
    distance: float
    lsn: int
    payload: Optional[Dict[str, Any]] = None

    @property
    def text(self) -> Optional[str]:
        """The payload's ``text`` field, when it has one."""
        value = (self.payload or {}).get("text")
        return value if isinstance(value, str) else None

    @staticmethod
    def from_json(body: Dict[str, Any]) -> "Hit":
        return Hit(
            id=int(body["id"]),
            distance=float(body["distance"]),
            lsn=int(body["lsn"]),
            payload=payload_of(body.get("payload")),
        )


@dataclass(frozen=True)
class SearchResult:
    hits: List[Hit]
    took_us: int
    #: ``cloud`` for the cloud's API; an edge's ``local``, ``cloud`` or ``degraded``.
    source: str
    #: An edge's local answer proven to be the corpus's exact top-k.
    certified: bool = False
    #: An edge's local answer while cut off from the cloud past its lease.
    stale: bool = False
    #: Microseconds spent embedding a ``text`` query.
    embed_us: Optional[int] = None
    #: Cluster: shards no live node answered (the hits are the nearest of the others).
    missing_shards: List[int] = field(default_factory=list)

    @staticmethod
    def from_json(body: Dict[str, Any], source: Optional[str] = None) -> "SearchResult":
        return SearchResult(
            hits=[Hit.from_json(h) for h in body["hits"]],
            took_us=int(body["took_us"]),
            source=source or body["source"],
            certified=bool(body.get("certified", False)),
            stale=bool(body.get("stale", False)),
            embed_us=body.get("embed_us"),
            missing_shards=list(body.get("missing_shards", [])),
        )


@dataclass(frozen=True)
class ModelDescription:
    name: str
    dim: int
    checksum: str


@dataclass(frozen=True)
class Collection:
    name: str
    id: str
    dim: int
    metric: str
    points: int
    shards: int = 1
    model: Optional[ModelDescription] = None

    @staticmethod
    def from_json(body: Dict[str, Any]) -> "Collection":
        model = body.get("model")
        return Collection(
            name=body["name"],
            id=body["id"],
            dim=int(body["dim"]),
            metric=body["metric"],
            points=int(body["points"]),
            shards=int(body.get("shards", 1)),
            model=ModelDescription(**model) if model else None,
        )


@dataclass(frozen=True)
class Point:
    id: int
    vector: List[float]
    lsn: int = 0
    payload: Optional[Dict[str, Any]] = None

    @staticmethod
    def from_json(body: Dict[str, Any]) -> "Point":
        return Point(
            id=int(body["id"]),
            vector=[float(x) for x in body["vector"]],
            lsn=int(body.get("lsn", 0)),
            payload=payload_of(body.get("payload")),
        )
