"""A local stand-in for RunPod serverless: ``python -m handler.local`` (``make serve``)."""
