"""The naive peer of bench/serve_load.py: a transformers `pipeline` behind FastAPI, one pipeline call per request.

This is what most tutorials deploy: `pipeline("text-classification")` in a sync FastAPI route (FastAPI runs
it on its thread pool, so concurrent requests run the model concurrently, each on its own one text).

    python bench/naive_pipeline_server.py MODEL_DIR --port 8001 [--threads 2]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import pipeline

    torch.set_num_threads(args.threads)
    classifier = pipeline("text-classification", model=args.model_dir, tokenizer=args.model_dir, device=-1,
                          top_k=None)
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/v1/classify")
    def classify(body: dict):
        predictions = []
        for scores in classifier(body["texts"], truncation=True):
            best = max(scores, key=lambda s: s["score"])
            predictions.append({"label": best["label"], "score": best["score"],
                                "probabilities": {s["label"]: s["score"] for s in scores}})
        return {"predictions": predictions}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
