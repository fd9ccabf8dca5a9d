"""tiervec's Python client: the cloud's and an edge's HTTP APIs (sync and async, httpx), and a
LangChain retriever in ``tiervec.langchain`` (``pip install 'tiervec[langchain]'``)."""

from .client import AsyncCloudClient, AsyncEdgeClient, CloudClient, EdgeClient
from .types import Collection, Hit, ModelDescription, Point, SearchResult, TiervecError

__all__ = [
    "AsyncCloudClient",
    "AsyncEdgeClient",
    "CloudClient",
    "Collection",
    "EdgeClient",
    "Hit",
    "ModelDescription",
    "Point",
    "SearchResult",
    "TiervecError",
]
