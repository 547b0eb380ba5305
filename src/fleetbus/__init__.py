"""fleetbus: claims and learned facts for a fleet of coding-agent sessions."""

__version__ = "0.1.0"
