"""Pruning that makes models really smaller and faster: unstructured masks and structured removal."""
