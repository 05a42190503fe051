"""Generated from proto/sie/v1 by scripts/gen_proto.py; do not edit."""
