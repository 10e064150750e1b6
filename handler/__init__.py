"""A RunPod serverless worker serving an LLM with vLLM (and LMCache), OpenAI-compatible."""
