"""A local stand-in for a RunPod serverless endpoint: ``python -m local_endpoint`` (``make serve``).

It does what RunPod documents for an endpoint (its public API, its OpenAI route, the webhooks
runpod's worker SDK calls, job states and limits), starts real worker processes
(``python -m handler``) against it, and is never part of the worker's image.
:mod:`local_endpoint.harness` is how tests and benchmarks start it and talk to it.
"""
