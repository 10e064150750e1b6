# Each target sets up what it needs on first use (virtual environment and default model, cached
# outside the clone); see scripts/dev-env.
.PHONY: help setup run serve test unit integration soak lint format check-image bench bench-stream bench-cache bench-repro bench-cold bench-burst bench-chat bench-lora docs

help:
	@echo "make run          set up, then run test_input.json through the worker on SmolLM2"
	@echo "make serve        set up, then serve a local RunPod endpoint (ARGS=\"--workers 2 ...\")"
	@echo "make test         set up, then lint, type-check and run every test"
	@echo "make unit         fast tests on the fake engine"
	@echo "make integration  tests on the real vLLM engine"
	@echo "make soak         the soak test for 30 minutes (SOAK_S=seconds to change)"
	@echo "make lint         ruff and mypy"
	@echo "make check-image  hadolint, the image's pins resolved, the worker's imports all in them"
	@echo "make docs         regenerate docs/settings.md from handler/settings.py"
	@echo "make bench        the full path vs vllm serve and the bare engine under load: table, chart"
	@echo "make bench-burst  16 requests at once: where the full path's time to first token goes"
	@echo "make bench-stream handler vs bare engine streaming overhead"
	@echo "make bench-cache  time to first token for a repeated prefix: no cache, prefix cache, LMCache"
	@echo "make bench-repro  same seed alone vs in a batch, and what the settings that hold cost"
	@echo "make bench-cold   cold start vs vllm serve, and a second start on a warm compile cache"
	@echo "make bench-chat   conversations across 2 workers: cached prompt share and TTFT, LMCache on vs off"
	@echo "make bench-lora   LoRA adapters by name: base-model tok/s with LORA_DIR on vs off, first-use load"

setup:
	@scripts/dev-env

run:
	scripts/in-env python -m handler.run_local test_input.json

serve:
	scripts/in-env python -m local_endpoint $(ARGS)

test: lint
	scripts/in-env python -m pytest

unit:
	scripts/in-env python -m pytest tests/unit

integration:
	scripts/in-env python -m pytest tests/integration

soak:
	SOAK_S=$${SOAK_S:-1800} scripts/in-env python -m pytest -s tests/integration/test_soak.py

lint:
	scripts/in-env ruff check handler local_endpoint tests builder bench
	scripts/in-env ruff format --check handler local_endpoint tests builder bench
	scripts/in-env mypy

check-image:
	scripts/in-env scripts/check-image

docs:
	scripts/in-env python builder/settings_doc.py > docs/settings.md.tmp
	mv docs/settings.md.tmp docs/settings.md

format:
	scripts/in-env ruff format handler local_endpoint tests builder bench
	scripts/in-env ruff check --fix handler local_endpoint tests builder bench

bench:
	scripts/in-env python -m bench.load $(ARGS)

bench-stream:
	scripts/in-env python -m bench.stream_overhead

bench-cache:
	scripts/in-env python -m bench.cache_ttft

bench-repro:
	scripts/in-env python -m bench.reproducibility

bench-cold:
	flock /tmp/engine.lock scripts/in-env python -m bench.cold_start $(ARGS)

bench-burst:
	flock /tmp/engine.lock scripts/in-env python -m bench.burst_timeline $(ARGS)

bench-chat:
	flock /tmp/engine.lock scripts/in-env python -m bench.conversations $(ARGS)

bench-lora:
	flock /tmp/engine.lock scripts/in-env python -m bench.lora_cost $(ARGS)
