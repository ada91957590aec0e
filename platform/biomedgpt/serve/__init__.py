"""Serving: the Ray Serve application (HTTP API) over exported model directories."""
