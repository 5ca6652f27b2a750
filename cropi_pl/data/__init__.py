"""Data plumbing: the curriculum DataModule and its resumable, rank-aware sampler."""
