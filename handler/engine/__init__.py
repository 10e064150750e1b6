"""The inference engine: the only package that imports vllm (a test walks every module's imports).

* :mod:`~handler.engine.interface`: what the handler needs of an engine (:class:`Engine`, the
  request and reply types, the stream's sentinels); vLLM in production, a fake in the tests.
* :mod:`~handler.engine.args`: vLLM's arguments from the settings, parsed by vLLM's own parser.
* :mod:`~handler.engine.asgi`: one request through vLLM's app as an in-process ASGI call.
* :mod:`~handler.engine.processes`: the engine's processes, stopped if vLLM's shutdown left any.
* :mod:`~handler.engine.vllm_engine`: :class:`VllmEngine`, vLLM's engine and app on their own loop.

This file imports nothing, so the interface costs no import of the engine's dependencies.
"""
