"""Losses: pure functions over padded (B, N) lists with a mask."""
