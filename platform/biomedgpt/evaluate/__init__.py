"""Evaluation: the papers' metrics (`metrics`) and scoring of prediction files (`score`)."""
