"""Clients of tiervec's HTTP APIs: the cloud's (`/v1/collections…`) and an edge's local
endpoint, each sync (``CloudClient``, ``EdgeClient``) and async (``AsyncCloudClient``,
``AsyncEdgeClient``), on httpx. Requests are the APIs' JSON; answers come back as the types of
``tiervec.types``; an error answer raises ``TiervecError`` with the API's code."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

import httpx

from .types import Collection, Point, SearchResult, TiervecError

DEFAULT_TIMEOUT = 30.0


def _search_body(
    vector: Optional[Sequence[float]],
    text: Optional[str],
    k: int,
    ef: Optional[int],
    with_payload: bool,
    extra: Dict[str, Any],
) -> Dict[str, Any]:
    if (vector is None) == (text is None):
        raise ValueError("give exactly one of `vector` and `text`")
    body: Dict[str, Any] = {"k": k, "with_payload": with_payload, **extra}
    if vector is not None:
        body["vector"] = [float(x) for x in vector]
    else:
        body["text"] = text
    if ef is not None:
        body["ef"] = ef
    return body


def _point_body(point: Any) -> Dict[str, Any]:
    if isinstance(point, Point):
        body: Dict[str, Any] = {"id": point.id, "vector": list(point.vector)}
        if point.payload is not None:
            body["payload"] = point.payload
        return body
    return dict(point)


def _answer(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    try:
        body = response.json()
        code, message = body.get("code", "error"), body.get("message", response.text)
    except ValueError:
        code, message = "error", response.text
    raise TiervecError(response.status_code, code, message)


def _headers(api_key: Optional[str]) -> Dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class CloudClient:
    """The cloud's API: collections, durable writes, searches by vector or text."""

    def __init__(self, url: str, api_key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT):
        self._http = httpx.Client(base_url=url, headers=_headers(api_key), timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "CloudClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def create_collection(
        self,
        name: str,
        dim: int,
        metric: str = "cosine",
        model: Optional[str] = None,
        shards: Optional[int] = None,
    ) -> Collection:
        body: Dict[str, Any] = {"name": name, "dim": dim, "metric": metric}
        if model is not None:
            body["model"] = model
        if shards is not None:
            body["shards"] = shards
        return Collection.from_json(_answer(self._http.post("/v1/collections", json=body)))

    def collection(self, name: str) -> Collection:
        return Collection.from_json(_answer(self._http.get(f"/v1/collections/{name}")))

    def collections(self) -> List[Collection]:
        body = _answer(self._http.get("/v1/collections"))
        return [Collection.from_json(c) for c in body["collections"]]

    def drop_collection(self, name: str) -> int:
        return _answer(self._http.delete(f"/v1/collections/{name}"))["lsn"]

    def upsert(self, name: str, points: Iterable[Any]) -> int:
        """Writes points (``Point``s or dicts ``{id, vector, payload?}``); returns the LSN once
        they are durable."""
        body = {"points": [_point_body(p) for p in points]}
        return _answer(self._http.put(f"/v1/collections/{name}/points", json=body))["lsn"]

    def delete(self, name: str, ids: Iterable[int]) -> int:
        body = {"ids": list(ids)}
        return _answer(self._http.post(f"/v1/collections/{name}/points/delete", json=body))["lsn"]

    def get(self, name: str, id: int) -> Point:
        return Point.from_json(_answer(self._http.get(f"/v1/collections/{name}/points/{id}")))

    def search(
        self,
        name: str,
        vector: Optional[Sequence[float]] = None,
        text: Optional[str] = None,
        k: int = 10,
        ef: Optional[int] = None,
        exact: bool = False,
        with_payload: bool = True,
    ) -> SearchResult:
        body = _search_body(vector, text, k, ef, with_payload, {"exact": exact})
        answer = _answer(self._http.post(f"/v1/collections/{name}/search", json=body))
        return SearchResult.from_json(answer, source="cloud")


class AsyncCloudClient:
    """``CloudClient``'s searches and reads, async."""

    def __init__(self, url: str, api_key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT):
        self._http = httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncCloudClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def collection(self, name: str) -> Collection:
        return Collection.from_json(_answer(await self._http.get(f"/v1/collections/{name}")))

    async def get(self, name: str, id: int) -> Point:
        response = await self._http.get(f"/v1/collections/{name}/points/{id}")
        return Point.from_json(_answer(response))

    async def upsert(self, name: str, points: Iterable[Any]) -> int:
        body = {"points": [_point_body(p) for p in points]}
        response = await self._http.put(f"/v1/collections/{name}/points", json=body)
        return _answer(response)["lsn"]

    async def search(
        self,
        name: str,
        vector: Optional[Sequence[float]] = None,
        text: Optional[str] = None,
        k: int = 10,
        ef: Optional[int] = None,
        exact: bool = False,
        with_payload: bool = True,
    ) -> SearchResult:
        body = _search_body(vector, text, k, ef, with_payload, {"exact": exact})
        response = await self._http.post(f"/v1/collections/{name}/search", json=body)
        return SearchResult.from_json(_answer(response), source="cloud")


class EdgeClient:
    """An edge's local endpoint: searches answered from its cache or, when it is not
    confident, by the cloud (``SearchResult.source``)."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT):
        self._http = httpx.Client(base_url=url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "EdgeClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def healthy(self) -> bool:
        try:
            return self._http.get("/healthz").is_success
        except httpx.TransportError:
            return False

    def readiness(self) -> Dict[str, Any]:
        """``/readyz``: ``ready`` (the cache is open), ``link_up``, what the cache holds, and
        whether the edge takes texts."""
        return _answer(self._http.get("/readyz"))

    def search(
        self,
        collection: str,
        vector: Optional[Sequence[float]] = None,
        text: Optional[str] = None,
        k: int = 10,
        ef: Optional[int] = None,
        with_payload: bool = True,
        local_only: bool = False,
    ) -> SearchResult:
        body = _search_body(vector, text, k, ef, with_payload, {"local_only": local_only})
        answer = _answer(self._http.post(f"/v1/collections/{collection}/search", json=body))
        return SearchResult.from_json(answer)


class AsyncEdgeClient:
    """``EdgeClient``, async."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT):
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncEdgeClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def search(
        self,
        collection: str,
        vector: Optional[Sequence[float]] = None,
        text: Optional[str] = None,
        k: int = 10,
        ef: Optional[int] = None,
        with_payload: bool = True,
        local_only: bool = False,
    ) -> SearchResult:
        body = _search_body(vector, text, k, ef, with_payload, {"local_only": local_only})
        response = await self._http.post(f"/v1/collections/{collection}/search", json=body)
        return SearchResult.from_json(_answer(response))
