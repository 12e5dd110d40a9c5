"""Reward models behind one interface and a registry."""
