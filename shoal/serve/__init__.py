"""shoal.serve"""
