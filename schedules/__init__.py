"""Per-arch schedule search spaces (schedules/<arch>.yaml), shipped as package data."""
