"""Bin-packing scheduler plugin for Cube (entry point ``cube.scheduler: binpack``)."""
