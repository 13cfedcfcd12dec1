"""Load generator and fault scenarios for the LVLM Attribution Service (issue 8; docs/load.md)."""
