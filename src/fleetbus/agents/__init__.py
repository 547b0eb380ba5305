"""Coding agents on the bus: hooks, the session sidecar, the git guard, MCP.

Kept empty of imports: ``fleetbus hook`` loads its modules on every agent
tool call, and a package import here would be paid by each of them.
"""
