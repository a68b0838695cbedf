"""Talking to Kaggle: the official client (imported only here, and only when a stage needs it) and
notebook mode."""
