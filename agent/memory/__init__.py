"""Memory: who holds memory now, who waits for it, and what to give back when the host runs short.

The admission ledger (host and per GPU), the admission queue and ``contextSize: auto``, the pressure watchdog,
eviction order, what a running server really uses (footprints) and the GPUs as the agent sees them. Built on
``agent.estimate`` and the unit types of ``agent.sources``; the engine wires it to running units
(``agent.engine.memory_guard``).
"""
