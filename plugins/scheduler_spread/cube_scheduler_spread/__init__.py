"""Spreading scheduler plugin for Cube (entry point ``cube.scheduler: spread``)."""
