"""Kimad's controller: from measured bandwidth and a time budget to a per-tensor compression plan."""
