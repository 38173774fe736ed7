"""shoal.parallel"""
