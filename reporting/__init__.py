"""Measuring what training did: paired statistics and the report of ``synpref evaluate``."""
