"""Physics for the gwi task: OpenFWI's acoustic forward model (`forward_model`), OpenFWI-like
velocity-map generators (`gwi.physics.velocity`), synthetic-data generation
(`python -m gwi.physics.synth`), and the seismic misfit and full-waveform-inversion refinement of
predicted maps (`seismic_misfit`, `refine`; `gwi.physics.fwi`)."""
from gwi.physics.acoustic import DEFAULTS, OPENFWI_SOURCES, forward_model, ricker
from gwi.physics.fwi import refine, seismic_misfit, total_variation

__all__ = ["DEFAULTS", "OPENFWI_SOURCES", "forward_model", "refine", "ricker", "seismic_misfit", "total_variation"]
