"""Models: where a model's files are, and getting them there.

The model store (remote sources mapped to files, local paths confined to allowed roots), remote GGUF headers read by
HTTP Range for pre-flight before download, and the resumable, verified download itself. The engine decides when
to fetch (``agent.engine.model_fetch``).
"""
