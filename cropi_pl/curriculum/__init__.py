"""The multi-stage curriculum: a Callback that reselects the training subset per stage."""
