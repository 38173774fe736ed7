"""shoal.frontend"""
