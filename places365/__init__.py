"""places365"""
