"""shoal.checkpoint"""
