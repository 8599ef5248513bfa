"""OpenAI-compatible HTTP server with continuous batching (``tools/serve.py``): protocol.py (requests -> processor
messages, errors, response bodies), engine.py (the engine loop over runtime.slots), metrics.py, app.py (HTTP)."""
