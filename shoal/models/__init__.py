"""shoal.models"""
