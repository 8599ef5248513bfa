#!/usr/bin/env python
"""OpenAI-compatible server for GLM-4.1V with continuous batching.

  python tools/serve.py --model_name tiny-random --port 8000
  python tools/serve.py --model_name /models/GLM-4.1V-9B-Thinking --device Ascend --dtype bfloat16 --max_batch 16

Endpoints: POST /v1/chat/completions (JSON or SSE), GET /v1/models, /health, /metrics. See README "Serving".
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from glm4v_ms.apps.serve.app import main

    sys.exit(main())
