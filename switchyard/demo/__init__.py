"""Demo OpenAI-compatible upstreams for local mode and tests (see ``upstream``)."""
