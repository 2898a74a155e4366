"""Rankers that teach the pre-rankers (DIN, LightGBM). ``TEACHERS`` is their registry."""

from teachers.din import DIN

TEACHERS = {"din": DIN}
