"""Two-tower pre-rankers (one file each) and their shared parts."""
