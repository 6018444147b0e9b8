"""Seismic full-waveform inversion: velocity maps from shot gathers (OpenFWI / Kaggle "Yale/UNC-CH
Geophysical Waveform Inversion"). Importing the package registers the "gwi" task."""
from gwi import task  # noqa: F401  (registers the task)
