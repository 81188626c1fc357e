"""metal-agent: memory-safe local LLM serving for Kubernetes Model objects."""

__version__ = "0.1.0"
