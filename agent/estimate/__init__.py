"""Estimate: what a model needs, from its GGUF header alone, and whether that fits a budget.

The bottom of the agent, below everything but ``agent.util``: the header reader and the model shape, the KV cache,
compute and overhead model, the estimator and its device split, budgets, the host's usable memory, llama.cpp's own
memory report and the pre-flight verdict. Pure functions of their inputs (plus tiny-model writers for the tests);
nothing here knows about processes, units or plugins.
"""
