"""shoal.comm"""
