"""Generated from proto/lvlm_attribution/api/torchserve/inference.proto."""
