"""Physics for the gwi task: OpenFWI's acoustic forward model (`forward_model`), OpenFWI-like
velocity-map generators (`gwi.physics.velocity`) and synthetic-data generation
(`python -m gwi.physics.synth`)."""
from gwi.physics.acoustic import DEFAULTS, OPENFWI_SOURCES, forward_model, ricker

__all__ = ["DEFAULTS", "OPENFWI_SOURCES", "forward_model", "ricker"]
