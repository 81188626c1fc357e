"""Engine: the pipeline that turns Model and InferenceService events into supervised servers.

Events in, hooks called in order (``resolve_budget`` -> ``preflight`` -> spawn -> ``report``), units kept in their
phases, servers started on demand. It drives ``agent.memory``, ``agent.processes`` and ``agent.models`` and is
driven by the sources (``agent.sources``, ``agent.kube``) and served by ``agent.service``.
"""
