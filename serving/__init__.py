"""The inspection service (FastAPI + ONNX Runtime). Never imports torch."""
