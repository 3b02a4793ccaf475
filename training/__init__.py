"""Networks, augmentation, the fit loop and ONNX export (the only package that imports torch)."""
