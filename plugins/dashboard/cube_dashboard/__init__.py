"""Cube's web dashboard (``[[api]] plugin = "dashboard"``): see docs/dashboard.md."""
