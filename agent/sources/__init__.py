"""Sources: Model and InferenceService objects, what they pair into, and the standalone source of them.

The manifest parser (the LLMKube objects, validated), the serving unit (one InferenceService with its Model), and
the standalone source, a directory of manifests watched for changes. Below the engine: the engine consumes its
events. The Kubernetes source is ``agent.kube``, above the engine because it also reports back to the cluster.
"""
