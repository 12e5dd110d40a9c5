"""synpref.reporting: what a person reads: end-of-job summaries, inspect reports (text, HTML)."""
