"""escarda_lab: architecture ablations of the Escarda-86M decoder LM."""

__version__ = "0.1.0"
