"""Glue between hf_squeeze and the frameworks it plugs into."""
