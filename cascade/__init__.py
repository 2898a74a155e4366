"""cascade: multi-stage recommendation cascades."""
