"""Calibration tooling shared by the methods that calibrate (each method's calibrator sits beside the method), and
artifact files."""
