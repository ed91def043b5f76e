"""Autotuning records (tuning_logs/<arch>/<gpu>.jsonl), shipped as package data."""
