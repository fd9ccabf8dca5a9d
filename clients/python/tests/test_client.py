"""The client and the retriever against a real cloud and a real edge (conftest.py)."""

from __future__ import annotations

import asyncio

import pytest

from tiervec import (
    AsyncCloudClient,
    AsyncEdgeClient,
    CloudClient,
    EdgeClient,
    TiervecError,
)
from tiervec.langchain import TiervecRetriever

from conftest import COLLECTION, MODEL


def test_cloud_collections_texts_and_payloads(servers, records):
    with CloudClient(servers["cloud"]) as cloud:
        notes = cloud.collection(COLLECTION)
        assert (notes.dim, notes.points, notes.metric) == (384, len(records), "cosine")
        assert notes.model is not None and notes.model.name == MODEL.name
        assert COLLECTION in [c.name for c in cloud.collections()]
        for record in records[:20:7]:
            result = cloud.search(COLLECTION, text=record["text"], k=3)
            top = result.hits[0]
            assert top.id == record["id"]
            assert top.text == record["text"] and top.payload["kind"] == "gloss"
            assert result.source == "cloud" and result.embed_us and result.embed_us > 0
        point = cloud.get(COLLECTION, records[3]["id"])
        assert len(point.vector) == 384 and point.payload["text"] == records[3]["text"]
        by_vector = cloud.search(COLLECTION, vector=point.vector, k=1)
        assert by_vector.hits[0].id == point.id and by_vector.embed_us is None


def test_cloud_errors_are_typed(servers):
    with CloudClient(servers["cloud"]) as cloud:
        with pytest.raises(TiervecError) as missing:
            cloud.search("no-such-collection", text="a dog", k=1)
        assert (missing.value.status, missing.value.code) == (404, "collection_not_found")
        with pytest.raises(TiervecError) as empty:
            cloud.search(COLLECTION, text="   ", k=1)
        assert (empty.value.status, empty.value.code) == (400, "invalid_text")
        with pytest.raises(ValueError):
            cloud.search(COLLECTION, k=1)
        cloud.create_collection("vectors-only", dim=4, metric="l2")
        cloud.upsert("vectors-only", [{"id": 1, "vector": [1, 2, 3, 4]}])
        with pytest.raises(TiervecError) as no_model:
            cloud.search("vectors-only", text="a dog", k=1)
        assert no_model.value.code == "no_model"
        cloud.drop_collection("vectors-only")


def test_async_cloud_client(servers, records):
    async def run():
        async with AsyncCloudClient(servers["cloud"]) as cloud:
            results = await asyncio.gather(
                *(cloud.search(COLLECTION, text=r["text"], k=1) for r in records[40:45])
            )
            return [r.hits[0].id for r in results]

    assert asyncio.run(run()) == [r["id"] for r in records[40:45]]


def test_edge_answers_texts(servers, records):
    with EdgeClient(servers["edge"]) as edge:
        assert edge.healthy()
        readiness = edge.readiness()
        assert readiness["ready"] and readiness["link_up"] and readiness["takes_text"]
        assert readiness["collection"] == COLLECTION
        for record in records[60:66]:
            result = edge.search(COLLECTION, text=record["text"], k=3)
            assert result.source in ("local", "cloud")
            assert result.hits[0].id == record["id"]
            assert result.embed_us and result.embed_us > 0
        local = edge.search(COLLECTION, text=records[60]["text"], k=1, local_only=True)
        assert local.source in ("local", "degraded")


def test_async_edge_client(servers, records):
    async def run():
        async with AsyncEdgeClient(servers["edge"]) as edge:
            result = await edge.search(COLLECTION, text=records[70]["text"], k=1)
            return result.hits[0].id

    assert asyncio.run(run()) == records[70]["id"]


def test_langchain_retriever_over_the_cloud(servers, records):
    retriever = TiervecRetriever(client=CloudClient(servers["cloud"]), collection=COLLECTION, k=2)
    docs = retriever.invoke(records[9]["text"])
    assert len(docs) == 2
    assert docs[0].page_content == records[9]["text"]
    assert docs[0].metadata["id"] == records[9]["id"]
    assert docs[0].metadata["source"] == "cloud"
    assert docs[0].metadata["distance"] < 0.01
    assert docs[0].metadata["payload"]["kind"] == "gloss"
    async_retriever = TiervecRetriever(
        client=CloudClient(servers["cloud"]),
        async_client=AsyncCloudClient(servers["cloud"]),
        collection=COLLECTION,
        k=1,
    )
    docs = asyncio.run(async_retriever.ainvoke(records[11]["text"]))
    assert docs[0].metadata["id"] == records[11]["id"]


def test_langchain_retriever_through_the_edge(servers, records):
    retriever = TiervecRetriever(client=EdgeClient(servers["edge"]), collection=COLLECTION, k=1)
    docs = retriever.invoke(records[80]["text"])
    assert docs[0].metadata["id"] == records[80]["id"]
    assert docs[0].metadata["source"] in ("local", "cloud")
    assert isinstance(docs[0].metadata["certified"], bool)
