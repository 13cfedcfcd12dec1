"""Generated from proto/lvlm_attribution/api/v1/explain.proto."""
