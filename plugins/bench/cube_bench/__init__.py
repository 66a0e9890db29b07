"""Cube benchmarks, a distribution of their own (``cube-bench``): ``cube bench restore`` and
``cube bench create``. The ``cube`` command finds them through the ``cube.cli`` entry point ``bench``."""
