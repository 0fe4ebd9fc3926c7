"""Example models and data for bncal (not part of the installed package); see models/README.md."""
