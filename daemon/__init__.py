"""histod.daemon"""
