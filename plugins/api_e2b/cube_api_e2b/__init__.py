"""E2B-compatible API plugin for Cube (entry point ``cube.api: e2b``)."""
