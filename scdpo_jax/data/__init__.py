"""Preference-pair data: the batch format the trainer consumes, sources, converters, caching."""
