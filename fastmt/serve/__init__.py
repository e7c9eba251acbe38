"""Serving what a run made: Hugging Face dirs, ONNX, predictions, serving speed."""
