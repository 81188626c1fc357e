"""Processes: starting, probing and stopping inference servers, and remembering them across restarts.

The supervisor and each server's log writer, the allowlisted server environment, the mark each server carries,
the state file and its keeper, adoption of servers a previous agent left running, the one-agent-per-state-dir
lock and free ports. Knows nothing of Models or pipelines: it runs argv lists.
"""
