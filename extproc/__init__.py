"""The Envoy external processor: parses requests, scores prompts, decides the model."""
