"""Serving: the model registry (`registry.py`), the serving spec and its Ray Serve config (`spec.py`), and the
Ray Serve application (`app.py`: the FastAPI ingress with API keys and the multiplexed, batching model
deployment) over its model sources (`sources.py`), API schemas (`schemas.py`), request reading and checks
(`requests.py`) and model-side inference (`engine.py`, over `biomedgpt.inference.Predictor`)."""
