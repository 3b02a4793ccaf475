"""The model artifact: ONNX file + model card, the versioned store, ONNX Runtime sessions, prediction.

Never imports torch or fastapi.
"""
