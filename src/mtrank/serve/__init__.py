"""Serving: the HTTP ranking service, ONNX export and fused scores (the bundle format itself is
:mod:`mtrank.bundle`)."""
