"""Switchyard: route every LLM request to the cheapest model that can answer it well."""

__version__ = "0.1.0"
