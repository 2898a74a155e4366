"""The export tests share ``tests/conftest.py``'s ``trained`` cascade and its ``bundle``."""


