"""Sources: where Model and InferenceService objects come from outside Kubernetes.

The manifest parser (the LLMKube objects, validated) and the standalone source, a directory of manifests watched for
changes. The Kubernetes source is ``agent.kube``, a sibling at the same layer.
"""
