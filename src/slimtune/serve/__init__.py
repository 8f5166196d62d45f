"""`slimtune serve`: an HTTP server for a model directory or an exported ONNX directory.

`app.py` builds the FastAPI app (routes, auth, limits, metrics, hot reload), `batcher.py` groups
requests into batches, `backends.py` loads what a directory holds. The ONNX path imports onnxruntime,
tokenizers and numpy only, never torch: nothing here imports torch at module level.
"""
