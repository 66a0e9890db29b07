"""Public testing helpers for Cube and its plugin authors: fakes, contract suites, fixtures."""
