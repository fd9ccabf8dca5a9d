"""A LangChain retriever over tiervec: each hit becomes a ``Document`` whose content is the
payload's text field and whose metadata carry the id, the distance, where the answer came from
(``local``, ``cloud``, ``degraded``) and whether it was certified exact, and the payload."""

from __future__ import annotations

from typing import Any, List, Optional, Union

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from .client import AsyncCloudClient, AsyncEdgeClient, CloudClient, EdgeClient
from .types import SearchResult


class TiervecRetriever(BaseRetriever):
    """Retrieves the ``k`` nearest texts of ``collection`` by a question's text, through an
    edge (``EdgeClient``) or the cloud (``CloudClient``); ``async_client`` (their async
    versions) serves ``ainvoke``, which otherwise runs the sync search in a thread."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    client: Union[EdgeClient, CloudClient]
    collection: str
    k: int = 4
    text_field: str = "text"
    async_client: Optional[Union[AsyncEdgeClient, AsyncCloudClient]] = None

    def _documents(self, result: SearchResult) -> List[Document]:
        return [
            Document(
                page_content=str((hit.payload or {}).get(self.text_field, "")),
                metadata={
                    "id": hit.id,
                    "distance": hit.distance,
                    "source": result.source,
                    "certified": result.certified,
                    "payload": hit.payload,
                },
            )
            for hit in result.hits
        ]

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> List[Document]:
        return self._documents(self.client.search(self.collection, text=query, k=self.k))

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> List[Document]:
        if self.async_client is None:
            return await super()._aget_relevant_documents(query, run_manager=run_manager)
        result = await self.async_client.search(self.collection, text=query, k=self.k)
        return self._documents(result)
