"""Ops over a given sparse code: decode, and the decoder losses."""
