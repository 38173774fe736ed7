"""shoal.moe"""
