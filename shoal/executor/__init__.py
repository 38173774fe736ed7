"""shoal.executor"""
