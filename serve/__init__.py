"""Serve: the HTTP API, the diffusion engine and the Ray Serve application."""
