"""Rankers that teach the pre-rankers (DIN, LightGBM)."""
