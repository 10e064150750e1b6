"""``python -m handler``: the worker entry point the image runs. See handler.worker."""

if __name__ == "__main__":  # vLLM's spawned processes re-import this module: build nothing then
    from handler.worker import main

    main()
