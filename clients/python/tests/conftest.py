"""A real cloud and a real edge for the client's tests, from the workspace's release binaries
(``TIERVEC_BIN_DIR``, default ``target/release``), with the shipped model (``TIERVEC_MODEL``)
and the first base texts of the dataset (``TIERVEC_DATA``) loaded by ``tiervec-cloud load``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(os.environ.get("TIERVEC_BIN_DIR", ROOT / "target" / "release"))
DATA = Path(os.environ.get("TIERVEC_DATA", ROOT.parent / "shared" / "data"))
MODEL = Path(os.environ.get("TIERVEC_MODEL", ROOT.parent / "shared" / "models" / "all-MiniLM-L6-v2"))
RECORDS = 200
COLLECTION = "notes"


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, ready, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{what} within {within} s")


def binary(name: str) -> str:
    path = BIN / name
    if not path.exists():
        raise AssertionError(f"{path} is missing: cargo build --release -p {name}")
    return str(path)


@pytest.fixture(scope="session")
def records() -> List[Dict]:
    out = []
    with open(DATA / "base.jsonl") as f:
        for i, line in enumerate(f):
            if i == RECORDS:
                break
            text = json.loads(line)["text"]
            out.append({"id": 5_000 + i, "text": text, "kind": "gloss"})
    return out


@pytest.fixture(scope="session")
def servers(tmp_path_factory, records) -> Iterator[Dict[str, str]]:
    work = tmp_path_factory.mktemp("tiervec")
    certs = work / "certs"
    subprocess.run(
        [binary("tiervec-cloud"), "certs", "--dir", str(certs), "--server-name", "localhost", "--edge", "edge-1"],
        check=True,
        capture_output=True,
    )
    quic = free_port(socket.SOCK_DGRAM)
    addr_file = work / "cloud.addr"
    processes = []
    try:
        cloud_log = open(work / "cloud.log", "w")
        processes.append(
            subprocess.Popen(
                [
                    binary("tiervec-cloud"), "serve",
                    "--set", f'data_dir="{work / "data"}"',
                    "--set", 'http_addr="127.0.0.1:0"',
                    "--set", f'quic_addr="127.0.0.1:{quic}"',
                    "--set", f'certs_dir="{certs}"',
                    "--set", 'edges={edge-1=["*"]}',
                    "--set", f'model_dir="{MODEL}"',
                    "--addr-file", str(addr_file),
                ],
                stdout=subprocess.DEVNULL,
                stderr=cloud_log,
            )
        )
        wait_until("the cloud writes its address", addr_file.exists)
        cloud = f"http://{addr_file.read_text().strip()}"
        wait_until("the cloud is ready", lambda: httpx.get(f"{cloud}/readyz").is_success)

        jsonl = work / "notes.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
        subprocess.run(
            [binary("tiervec-cloud"), "load", "--collection", COLLECTION, "--jsonl", str(jsonl),
             "--model", str(MODEL), "--url", cloud],
            check=True,
            capture_output=True,
            cwd=work,
        )

        edge_port = free_port(socket.SOCK_STREAM)
        config = work / "edge.toml"
        config.write_text(
            "\n".join(
                [
                    'name = "edge-1"',
                    f'snapshot = "{work / "edge.tvs"}"',
                    f'collection = "{COLLECTION}"',
                    f'http_addr = "127.0.0.1:{edge_port}"',
                    f'model_dir = "{MODEL}"',
                    "deadline_ms = 2000",
                    "[cloud]",
                    f'addr = "127.0.0.1:{quic}"',
                    'server_name = "localhost"',
                    f'ca_cert = "{certs / "ca.pem"}"',
                    f'cert = "{certs / "edges" / "edge-1.pem"}"',
                    f'key = "{certs / "edges" / "edge-1.key"}"',
                ]
            )
            + "\n"
        )
        edge_log = open(work / "edge.log", "w")
        processes.append(
            subprocess.Popen(
                [binary("tiervec-edge"), "serve", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=edge_log,
            )
        )
        edge = f"http://127.0.0.1:{edge_port}"
        wait_until("the edge serves", lambda: httpx.get(f"{edge}/healthz").is_success)
        # Answered by the cloud once the edge's link is up (its cache starts empty).
        probe = {"text": records[0]["text"], "k": 1}
        wait_until(
            "the edge answers from the cloud",
            lambda: httpx.post(f"{edge}/v1/collections/{COLLECTION}/search", json=probe).json().get("source")
            == "cloud",
        )
        yield {"cloud": cloud, "edge": edge}
    finally:
        for p in processes:
            p.kill()
            p.wait()
