"""Serving: the model registry (`registry.py`), the serving spec and its Ray Serve config (`spec.py`), and the
Ray Serve application (`app.py`: FastAPI ingress with API keys, multiplexed and batching model deployment)
with request checks (`inputs.py`) and model-side inference (`engine.py`)."""
