"""Image decoding, the preprocessing contract, synthetic generators, adapters and manifests.

Never imports torch or fastapi: serving and QA use this package too.
"""
