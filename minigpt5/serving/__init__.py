"""Triton python-backend models over the model package. Each `model_repository/*/1/model.py` is a
thin shell around one class here; `minigpt5/launcher/` runs the real tritonserver on them."""
