"""Engine: the pipeline that turns Model and InferenceService events into supervised servers.

Events in, hooks called in order (``resolve_budget`` -> ``preflight`` -> spawn -> ``report``), units kept in their
phases, model files fetched, memory guarded, servers started on demand, metrics counted. It drives
``agent.memory``, ``agent.processes`` and ``agent.models``, reads its settings from ``agent.config``, and is fed by
``agent.kube`` (and the standalone source) and served by ``agent.service``.
"""
