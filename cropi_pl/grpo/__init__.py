"""GRPO math: group-relative advantages and the clipped token-ratio policy loss."""
