"""Quantization specs, observers and calibration methods (filled by the quantization issue)."""
