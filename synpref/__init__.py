"""synpref: synthetic ranked preference data (Syn-Pic) and RankDPO training for T2I models."""

__version__ = "0.1.0"
