"""Run bookkeeping shared by every command that writes a folder: lock, marker, flags, up-to-date, health, summaries."""
