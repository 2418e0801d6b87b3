"""Triton python-backend models over the model package. Each `model_repository/*/1/model.py` is a
thin shell around one class here; `server.py` runs the real tritonserver (`minigpt5 serve`)."""
