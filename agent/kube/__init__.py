"""Kubernetes mode: Models and InferenceServices come from the API server through a list-then-watch source.

The watch loop (``watch_loop``) is kept apart from what is done with its events (``ownership``, ``source``), as
kopf keeps its watcher apart from its handlers: the loop only lists, watches, resumes and backs off. What the
agent does goes back through the ``report`` hook (``report``: status, Events in ``events``, Services and
EndpointSlices in ``endpoints`` and ``registration``), one worker per object (``reconcile``).
"""
