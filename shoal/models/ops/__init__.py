"""Fused CPU kernels (C++ built on first use) and their pure-torch references."""
